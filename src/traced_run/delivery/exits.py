"""The exit path's hooks: every way a process ends runs ``close`` once,
on the thread that ends it (atexit, SIGTERM, ``os._exit``). What close()
does is in ``Delivery.close``.

SIGTERM is ours only while nothing else claims it: an app (a server) whose
own handler was there first decides what SIGTERM means, typically letting
requests in flight finish, so delivery waits for the exit that follows
(atexit, ``os._exit``, or dying by SIGTERM once the server gives it back)."""

from __future__ import annotations

import atexit
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

_set_handler = signal.signal
"""The real ``signal.signal``: ``install`` puts a wrapper in its place."""


class _Hooks:
    def __init__(self, close: Callable[[str], None]) -> None:
        self._close = close
        self.signalled: str | None = None
        """A SIGTERM the app's own handler took: what cut off the runs the exit ends."""

    def close(self, why: str) -> None:
        self._close(self.signalled or why)


def install(close: Callable[[str], None]) -> None:
    hooks = _Hooks(close)
    atexit.register(hooks.close, "process exit")
    _close_at_os_exit(hooks)
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous != signal.SIG_IGN:  # ignored stays ignored, here and in what this process execs
            _set_handler(signal.SIGTERM, _ChainedSigterm(hooks, previous))
    except ValueError:  # not the main thread: the app's own exit path still runs atexit
        return
    _keep_default_sigterm(hooks)


def _close_at_os_exit(hooks: _Hooks) -> None:
    """Flush even when the process ends with ``os._exit``, as workers of
    multiprocessing and prefork servers do. Wrapped in every traced process,
    not only in forked children: a forkserver's worker builds its pipeline
    after the fork (Python 3.11 does not preload ``__main__`` there), then
    ends with ``os._exit``."""
    real_exit = os._exit

    def exit_after_delivery(status: int) -> Any:
        hooks.close("os._exit")
        real_exit(status)

    os._exit = exit_after_delivery


def _keep_default_sigterm(hooks: _Hooks) -> None:
    """Setting SIGTERM back to its default sets ours: a server that set its own handler
    before the app was imported (``uvicorn --workers N``: each worker) puts the default
    back when it has finished its requests and raises SIGTERM again, and this process
    must deliver before it dies by it."""

    def set_handler(signalnum: Any, handler: Any) -> Any:
        if signalnum == signal.SIGTERM and handler == signal.SIG_DFL:
            handler = _ChainedSigterm(hooks, signal.SIG_DFL)
        return _set_handler(signalnum, handler)

    signal.signal = set_handler


class _ChainedSigterm:
    """Leaves SIGTERM to the app's handler, or, when there is none, delivers and dies by it."""

    def __init__(self, hooks: _Hooks, previous: Any) -> None:
        self._hooks = hooks
        self._previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if callable(self._previous):
            self._hooks.signalled = name
            self._previous(signum, frame)
            return
        self._hooks.close(name)
        _set_handler(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
