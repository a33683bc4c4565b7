"""The exit path's hooks: every way a process ends runs ``close`` once,
on the thread that ends it (atexit, SIGTERM, ``os._exit``). They hold no
state; what close() does is in ``Delivery.close``."""

from __future__ import annotations

import atexit
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any


def install(close: Callable[[str], None]) -> None:
    atexit.register(close, "process exit")
    _close_at_os_exit(close)
    try:
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _ChainedSigterm(close, previous))
    except ValueError:  # not the main thread: the app's own exit path still runs atexit
        pass


def _close_at_os_exit(close: Callable[[str], None]) -> None:
    """Flush even when the process ends with ``os._exit``, as workers of
    multiprocessing and prefork servers do. Wrapped in every traced process,
    not only in forked children: a forkserver's worker builds its pipeline
    after the fork (Python 3.11 does not preload ``__main__`` there), then
    ends with ``os._exit``."""
    real_exit = os._exit

    def exit_after_delivery(status: int) -> Any:
        close("os._exit")
        real_exit(status)

    os._exit = exit_after_delivery


class _ChainedSigterm:
    """Delivers, then does what SIGTERM did before: the app's handler, or dying by it."""

    def __init__(self, close: Callable[[str], None], previous: Any) -> None:
        self._close = close
        self._previous = previous

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self._close(signal.Signals(signum).name)
        if callable(self._previous):
            self._previous(signum, frame)
        elif self._previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
