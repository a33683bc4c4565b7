"""traced-run's commands: the Python launcher and its subcommands (``cli``), and
``doctor``, ``flush`` and ``mlflow`` (``local_mlflow``). Nothing below imports
from here."""
