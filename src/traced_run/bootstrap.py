"""What runs at interpreter start, from the ``sitecustomize`` on PYTHONPATH.

It installs an import hook and nothing more: the tracing pipeline is built
when the app first imports ``pydantic_ai``, so a process that never does pays
a few milliseconds. Imports here are the few modules a bare interpreter has
already loaded (``importlib.abc`` alone would pull in ``pathlib`` and
``tempfile``; the finder is duck-typed instead). The user's own
``sitecustomize`` (the next one on ``sys.path``) still runs, once.
"""

import os
import sys

from traced_run import flags

# Annotations are quoted: ``from __future__ import annotations`` imports a module.
TYPE_CHECKING = False  # typing itself costs more than this whole module
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

BOOT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_boot")
"""The directory holding our ``sitecustomize``; the launcher puts it first on PYTHONPATH."""
SETTING_UP_ENV = "TRACED_RUN_SETTING_UP"
"""Holds the pid of a process building its pipeline: a process that pid spawns
meanwhile (a library probing something) must not build one of its own."""
WATCHED = "pydantic_ai"

_started = False


def start() -> None:
    """Called by our ``sitecustomize``: chain the user's, then wait for pydantic_ai."""
    global _started
    if _started:
        return
    _started = True
    launched = os.environ.pop(flags.LAUNCHED_ENV, None) == str(os.getpid())
    if launched:
        _check_launched()
    _run_user_sitecustomize()
    if flags.switched_off(os.environ):
        return
    spawner = os.environ.get(SETTING_UP_ENV)
    if spawner and spawner != str(os.getpid()):
        return
    if flags.strict(os.environ) and not launched:  # launched: checked already
        _check_settings_now()
    when_imported(WATCHED, _on_import)


def when_imported(name: str, then: "Callable[[ModuleType], None]") -> None:
    """Call ``then(module)`` once the module ``name`` has executed: now, if it has."""
    if name in sys.modules:
        then(sys.modules[name])
    else:
        sys.meta_path.insert(0, _ImportWatcher(name, then))


def _check_launched() -> None:
    """Under the shell launcher: what the launcher refuses stops the app before any
    of its code (or the user's sitecustomize) runs, with the launcher's own line."""
    from traced_run import startcheck

    message = startcheck.problem(os.environ)
    if message is not None:
        _refuse(message)


def _check_settings_now() -> None:
    """Strict mode: a bad setting stops the app before any of its code runs."""
    from traced_run import report
    from traced_run.config.sources import load

    try:
        load().say_notes()
    except report.ConfigError as error:
        _refuse(f"{error} (strict mode: not starting the app)")


def _refuse(message: str) -> None:
    from traced_run import report

    report.say(message)
    # SystemExit inside sitecustomize is a fatal startup error (exit 1 and a
    # traceback); nothing of the app has run yet, so there is nothing to flush.
    os._exit(report.EXIT_CONFIG)


def _on_import(module: "ModuleType") -> None:
    os.environ[SETTING_UP_ENV] = str(os.getpid())
    try:
        from traced_run import pipeline

        pipeline.install(when_imported)
    except Exception as error:  # runs inside the app's `import pydantic_ai`: fail open, whatever it is
        from traced_run import report

        report.say(f"could not set up tracing: {type(error).__name__}: {error}; the app runs untraced")
    finally:
        os.environ.pop(SETTING_UP_ENV, None)


class _ImportWatcher:
    """Calls ``then(module)`` right after the watched module has executed."""

    def __init__(self, name: str, then: "Callable[[ModuleType], None]") -> None:
        self._name = name
        self._then = then

    def find_spec(
        self, fullname: str, path: "Sequence[str] | None", target: "ModuleType | None" = None
    ) -> "ModuleSpec | None":
        if fullname != self._name:
            return None
        sys.meta_path.remove(self)
        spec = _find_spec(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module
        then = self._then

        def exec_then_set_up(module: "ModuleType") -> None:
            exec_module(module)
            then(module)

        loader.exec_module = exec_then_set_up  # type: ignore[method-assign]
        return spec


def _find_spec(
    fullname: str, path: "Sequence[str] | None", target: "ModuleType | None"
) -> "ModuleSpec | None":
    """What the finders after ours would answer: ``importlib.util.find_spec``
    without importing ``importlib.util`` at every interpreter start."""
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec(fullname, path, target) if find_spec is not None else None
        if spec is not None:
            return spec  # type: ignore[no-any-return]
    return None


def _path_finder() -> "Any":
    """``importlib.machinery.PathFinder``, taken from ``sys.meta_path`` where
    the interpreter put it: importing ``importlib.machinery`` costs a millisecond."""
    for finder in sys.meta_path:
        if getattr(finder, "__name__", "") == "PathFinder":
            return finder
    from importlib.machinery import PathFinder

    return PathFinder


def _run_user_sitecustomize() -> None:
    """Run the ``sitecustomize`` ours shadows, under its own name, exactly once."""
    ours = sys.modules.get("sitecustomize")
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != BOOT_DIR]
    spec = _path_finder().find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    from importlib.util import module_from_spec

    module = module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # what site.py does for a failing sitecustomize
        from traced_run import report

        if ours is not None:
            sys.modules["sitecustomize"] = ours
        report.say(f"the user sitecustomize {spec.origin} failed: {type(error).__name__}: {error}")
