"""The exit path's hooks: every way a process ends runs ``close`` once
(atexit, SIGTERM, ``os._exit``). What close() does is in ``Delivery.close``.

A signal handler runs on the main thread between two bytecodes of whatever
that thread was doing, traced-run's own locked code included: a handler that
took one of those locks would wait for itself for ever. So traced-run's
SIGTERM handler takes no lock: it puts the default back (a second SIGTERM ends
the process at once, as without traced-run) and wakes the exit thread through
a pipe (``os.write``). The exit thread delivers, bounded by ``exit_timeout``,
then raises SIGTERM again: the process dies by it, as it would have. Unless
the signal came inside traced-run's code (which may hold a lock the delivery
needs), the handler holds the main thread meanwhile, in a sleep that takes no
lock and ends with the bound: the app does no more work after SIGTERM than it
would have without traced-run. Inside traced-run's code the app's threads run
on while the exit thread delivers, and release what they hold.

SIGTERM is traced-run's only while the app leaves it at the default: an app
(a server) whose own handler is set decides what SIGTERM means, typically
letting requests in flight finish, so delivery waits for the exit that follows
(atexit, ``os._exit``, or dying by SIGTERM once the server gives it back).
An ignored SIGTERM stays ignored.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from traced_run import patches

_SIGTERM = "SIGTERM"


class _Hooks:
    """Runs ``close`` once; a second caller (another way out, on another thread) waits
    for the first to finish, at most ``patience`` seconds, so the process does not end
    under a delivery in progress."""

    def __init__(self, close: Callable[[str], None], patience: float) -> None:
        self._close = close
        self._patience = patience
        self.signalled: str | None = None
        """A SIGTERM the app's own handler took: what cut off the runs the exit ends."""
        self._fresh()
        os.register_at_fork(after_in_child=self._fresh)

    def _fresh(self) -> None:
        """Also in a forked child: a fork while the parent was closing leaves the child
        its own spans to deliver."""
        self._once = threading.Lock()
        self._done = threading.Event()

    @property
    def closed(self) -> bool:
        """Read from the signal handler: ``Event.is_set`` takes no lock."""
        return self._done.is_set()

    def close(self, why: str) -> None:
        if not self._once.acquire(blocking=False):
            self._done.wait(self._patience)
            return
        try:
            self._close(self.signalled or why)
        finally:
            self._done.set()


class _ExitThread:
    """Waits on a pipe for the SIGTERM handler's byte, then delivers and dies by SIGTERM."""

    def __init__(self, hooks: _Hooks) -> None:
        self._hooks = hooks
        self._write = -1
        self._read = -1
        self._pid = 0
        self._start()
        # A forked child has no thread of its parent's: it gets its own, and its own pipe.
        os.register_at_fork(after_in_child=self._start)

    def _start(self) -> None:
        for fd in (self._read, self._write):
            if fd >= 0:
                os.close(fd)
        self._read, self._write = os.pipe()
        self._pid = os.getpid()
        os.set_blocking(self._write, False)
        threading.Thread(target=self._wait, args=(self._read,), name="traced-run-exit", daemon=True).start()

    def wake(self) -> bool:
        """From the signal handler: one byte down the pipe; False when it cannot be written,
        or when the pipe is a parent's (a signal that reached a forked child before its
        fork hooks made its own pipe and thread: the parent would deliver and die)."""
        if os.getpid() != self._pid:
            return False
        try:
            return os.write(self._write, b"T") == 1
        except OSError:
            return False

    def _wait(self, read: int) -> None:
        try:
            if not os.read(read, 1):
                return
        except OSError:
            return
        try:
            self._hooks.close(_SIGTERM)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)


_OWN_CODE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""traced-run's package directory: a frame whose code is under it may hold one of its locks."""


def _inside_traced_run(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith(_OWN_CODE):
            return True
        frame = frame.f_back
    return False


def install(close: Callable[[str], None], patience: float, cut_off: Callable[[], None]) -> None:
    """Hook ``close`` into every way out. ``patience`` bounds how long one way out waits
    for a delivery another has begun. ``cut_off`` (called from the signal handler: it
    must take no lock) tells delivery that a SIGTERM the app handles came."""
    hooks = _Hooks(close, patience)
    atexit.register(hooks.close, "process exit")
    patches.exit_after(lambda: hooks.close("os._exit"))
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread: atexit still runs
    current = signal.getsignal(signal.SIGTERM)
    if current is None:
        return  # a handler set from C: it cannot be chained nor put back
    exit_thread = _ExitThread(hooks)

    def deliver_then_die(signum: int, frame: FrameType | None) -> None:
        patches.real_signal(signum, signal.SIG_DFL)
        if hooks.closed or not exit_thread.wake():
            os.kill(os.getpid(), signum)
        elif not _inside_traced_run(frame):
            time.sleep(patience)  # the exit thread ends the process sooner, once it has delivered
            os.kill(os.getpid(), signum)

    def stand_in(handler: Any) -> Any:
        if handler == signal.SIG_DFL:
            return deliver_then_die
        if not callable(handler):
            return handler  # SIG_IGN: ignored stays ignored, here and in what this process execs

        def chained(signum: int, frame: FrameType | None) -> Any:
            hooks.signalled = _SIGTERM
            cut_off()
            return handler(signum, frame)

        return chained

    patches.SigtermSlot(stand_in).install()
