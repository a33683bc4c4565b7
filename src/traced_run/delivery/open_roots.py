"""The roots of traces that leave this process before they end, kept where a later process
finds them if this one is killed.

A long run's ended spans go to MLflow before its root ends (``queue.OPEN_TRACE_WAIT``); MLflow
shows the trace IN_PROGRESS until the root comes. A process killed meanwhile (SIGKILL, the OOM
killer, a machine that went down) runs no code that could end the root, so the trace would stay
IN_PROGRESS for ever. So while such a trace's root is open, the spool holds it ended as
interrupted, in a record this process keeps locked (``Spool.hold_open``), written again with a
later end each time more of the trace leaves, and removed once the real root leaves. The kernel
lets the lock go when the process dies, however it dies; the next traced process (its delivery
thread) or ``traced-run flush`` then sends the record as a batch, and MLflow shows the trace
ended, ERROR, "interrupted: the process ended before this span did".

Only a root with no parent is kept: a root whose parent is in another process is not MLflow's
root of the trace. The record is written in the spool with the same care as a batch (the
user's private directory, no credentials), and read back as one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import ReadableSpan

from traced_run.config.settings import Settings
from traced_run.delivery.spool import Held, Spool

MAX_KEPT = 64
"""Open roots kept at once: each holds a file descriptor of the app's process while its trace is
open, and a server with thousands of long-open traces (websocket sessions) must not run out of
them; past it, a trace's root is not kept (if the process is killed, it stays IN_PROGRESS)."""


class OpenRoots:
    """The records of this process's open roots (by trace id), written and removed as spans leave:
    from the delivery thread, the spill thread and the exit path, so under a lock of its own."""

    def __init__(self, settings: Settings, spool: Spool,
                 root_of: Callable[[int], ReadableSpan | None]) -> None:
        """``root_of(trace_id)``: the trace's open root ended now as interrupted, as MLflow
        would get it; None when it has none open (it ended, or is not one to keep)."""
        self._settings = settings
        self._spool = spool
        self._root_of = root_of
        self._lock = threading.Lock()
        self._held: dict[int, Held] = {}

    def leaving(self, spans: Sequence[ReadableSpan]) -> None:
        """``spans`` leave this process now (posted or spooled). The record of a trace whose
        root is among them goes first: an ERROR root sent after the real one would overwrite
        it. A trace whose root stays open gets its record, or a later end in it."""
        ended = {span.context.trace_id for span in spans if span.context and span.parent is None}
        open_traces = {span.context.trace_id for span in spans if span.context} - ended
        with self._lock:
            for trace in ended:
                held = self._held.pop(trace, None)
                if held is not None:
                    with contextlib.suppress(OSError):
                        self._spool.let_go_open(held)
            for trace in open_traces:
                self._keep(trace)

    def _keep(self, trace: int) -> None:
        from traced_run.delivery.export import encode, target_of

        if trace not in self._held and len(self._held) >= MAX_KEPT:
            return
        root = self._root_of(trace)
        if root is None:
            return
        payload = encode([root], self._settings)
        if not payload:  # the root could not be encoded (said by encode)
            return
        # Not said: the record matters only if this process is killed, and a spool that cannot
        # be written is told when a batch needs it.
        with contextlib.suppress(OSError):
            self._held[trace] = self._spool.hold_open(target_of(self._settings), payload,
                                                      self._held.get(trace))
