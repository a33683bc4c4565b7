"""Helpers the tests share (imported as ``support.<module>``; fixtures stay in
tests/conftest.py): no test module imports another."""
