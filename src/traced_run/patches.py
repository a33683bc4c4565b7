"""Every change traced-run makes to another module's globals, in one place.

Each replacement wraps the original with ``functools.wraps`` (signature, name and
docstring stay), carries ``__traced_run__`` (so a second install, or anyone
reading it, can tell) and is applied at most once per process. ``uninstall``
puts every original back, newest first. What each change is for:

- ``os._exit``: workers of multiprocessing and prefork servers end with it,
  skipping atexit; the wrapper delivers first and always exits.
- ``signal.signal`` and ``signal.getsignal``: SIGTERM set back to its default
  sets traced-run's handler instead (a server gives SIGTERM back to the default
  once its requests are done, then raises it again: the process must deliver
  before it dies by it); ``getsignal`` still answers what the app set.
- ``InstrumentationSettings.__init__`` (pydantic-ai): each instrumentation the
  app (or logfire, or MLflow's autolog) sets up gets a tracer that also reaches
  traced-run.
- ``opentelemetry.trace.set_tracer_provider``: a global provider the app sets
  later is joined too.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from typing import Any

MARK = "__traced_run__"

_applied: list[tuple[object, str, Any]] = []
"""(owner, attribute, original) for each change in force, oldest first."""


def replace(owner: object, name: str, make: Callable[[Any], Callable[..., Any]]) -> bool:
    """Put ``make(original)`` in place of ``owner.name``; False (and nothing done) when
    traced-run already replaced it."""
    original = getattr(owner, name)
    if getattr(original, MARK, False):
        return False
    replacement = functools.wraps(original)(make(original))
    setattr(replacement, MARK, True)
    setattr(owner, name, replacement)
    _applied.append((owner, name, original))
    return True


def uninstall() -> None:
    """Every original back in place, newest change first."""
    while _applied:
        owner, name, original = _applied.pop()
        setattr(owner, name, original)


def exit_after(deliver: Callable[[], None]) -> None:
    """``os._exit`` runs ``deliver`` first; the real exit follows whatever it does."""

    def make(real_exit: Callable[[int], Any]) -> Callable[[int], Any]:
        def _exit(status: int) -> Any:
            try:
                deliver()
            finally:
                real_exit(status)

        return _exit

    replace(os, "_exit", make)


real_signal = signal.signal
"""``signal.signal`` as the interpreter has it: for traced-run's own handler."""


class SigtermSlot:
    """SIGTERM as the app set it, and the handler traced-run keeps in force for it.

    ``stand_in(app_handler)`` says what goes in force for what the app sets: its own
    handler as it is, or traced-run's (in place of the default, or chained before the
    app's). ``getsignal`` answers what the app set."""

    def __init__(self, stand_in: Callable[[Any], Any]) -> None:
        self._stand_in = stand_in
        self._in_force: Any = None
        self._app_view: Any = None

    def install(self) -> None:
        """Put ``stand_in``'s answer for the handler in force now; then watch ``signal.signal``.
        Only from the main thread (ValueError elsewhere)."""
        self._set(real_signal, signal.getsignal(signal.SIGTERM))
        replace(signal, "signal", self._signal)
        replace(signal, "getsignal", self._getsignal)

    def _set(self, real: Callable[[Any, Any], Any], handler: Any) -> Any:
        in_force = self._stand_in(handler)
        before, app_before = self._in_force, self._app_view
        previous = real(signal.SIGTERM, in_force)
        self._in_force, self._app_view = (in_force, handler) if in_force is not handler else (None, None)
        return app_before if before is not None and previous is before else previous

    def _signal(self, real: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def set_handler(signalnum: Any, handler: Any) -> Any:
            if signalnum != signal.SIGTERM:
                return real(signalnum, handler)
            return self._set(real, handler)

        return set_handler

    def _getsignal(self, real: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def getsignal(signalnum: Any) -> Any:
            handler = real(signalnum)
            if signalnum == signal.SIGTERM and self._in_force is not None and handler is self._in_force:
                return self._app_view
            return handler

        return getsignal
