# Only delegates: everything lives in traced_run.bootstrap. An interpreter that
# cannot import traced_run (another venv that inherited PYTHONPATH) stays untouched,
# unless a launcher started it (it leaves TRACED_RUN_LAUNCHED): then it says so.
try:
    from traced_run.bootstrap import start
except ImportError:
    import os

    if os.environ.pop("TRACED_RUN_LAUNCHED", None):
        from importlib.util import module_from_spec, spec_from_file_location
        from types import ModuleType

        def _ours(name: str) -> ModuleType:
            """A module of the package by its path, its directory not being on this sys.path:
            report and flags import the standard library alone."""
            package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            spec = spec_from_file_location(f"traced_run.{name}", os.path.join(package, f"{name}.py"))
            if spec is None or spec.loader is None:
                raise ImportError(name)
            module = module_from_spec(spec)
            spec.loader.exec_module(module)
            return module

        _ours("report").untraced_interpreter(_ours("flags").strict(os.environ))
else:
    start()
