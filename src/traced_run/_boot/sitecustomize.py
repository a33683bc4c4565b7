# Only delegates: everything lives in traced_run.bootstrap. An interpreter that
# cannot import traced_run (another venv that inherited PYTHONPATH) stays untouched.
try:
    from traced_run.bootstrap import start
except ImportError:
    pass
else:
    start()
