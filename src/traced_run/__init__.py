"""traced-run: zero-code tracing of pydantic-ai agent runs into MLflow.

Importing this package costs nothing beyond the standard library: the
bootstrap imports it at every interpreter start.
"""

__version__ = "0.1.0"
