"""Moves finished spans from the app's threads to MLflow, off those threads,
and never loses one silently.

A bounded queue feeds one daemon thread that batches (whole traces per
request, each once its local root has ended, or after ``queue.OPEN_TRACE_WAIT``),
encodes and posts. A batch MLflow does not take (refused, timeout,
5xx, 429) goes to the on-disk spool at once, and the thread backs off briefly
before asking MLflow again; while it waits, and when the queue runs high,
batches go straight to the spool. When MLflow answers again, the spool is
sent back, oldest first, one batch at a time (so no faster than MLflow
answers), by this process or the next traced one. A batch MLflow rejects as
invalid is set aside with the reason. At exit (normal, uncaught exception,
SIGINT, SIGTERM, ``os._exit`` in a forked child) the process waits at most
``exit_timeout`` and spools whatever is left; it does not wait at all for an
MLflow it has seen hang (its last post went unanswered for the post's whole
timeout, or MLflow has answered no post yet and the one in flight has waited
``exit_timeout`` already): what is left goes to the spool at once.

What the user is told, once: an outage that outlasts ``OUTAGE_NOTICE`` while
the process runs is one line then (a service that never exits must learn of
it); at exit, one line says what of this process's own spans is still in the
spool, was dropped or set aside, and, unless the outage was already told,
what was spooled and sent later. Nothing when all was delivered.

The parts, in OpenTelemetry's words where it has them, and the threads that
touch them (each part's module says how its state is guarded):

- ``DeliveryProcessor``: the span processor; ``queue.SpanQueue``: the batch
  processor's queue (batching, the batch in flight, the closing state); app
  threads, the delivery thread, the exit path.
- ``sender.DeliveryThread`` and ``sender.Backoff``: the batch processor's
  export thread, its retry back-off and what the posts showed of MLflow
  hanging; only the delivery thread (close also reads whether MLflow hangs,
  and resets the back-off).
- ``export.Sender``: the OTLP/HTTP exporter (encoding in ``export``, the
  connection in ``transport``).
- ``open_roots.OpenRoots``: the open roots of traces that left before they ended, kept in
  the spool for the next process to end if this one is killed; the threads that send or spool.
- ``spool.Spool``: the persistent retry queue on disk; ``spill.SpoolWriter``
  writes to it, ``spill.OverflowSpooler`` is the thread that spools what
  overflows the queue while a post holds the export thread.
- ``exits``: the hooks that run ``close`` (atexit, SIGTERM through the exit
  thread, ``os._exit``).
- ``stats.DeliveryStats``: the exporter's counts (sent, spooled, set aside,
  dropped), ``problem``, and the exit line; all threads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from traced_run.config.settings import Settings
from traced_run.delivery import exits
from traced_run.delivery.open_roots import OpenRoots
from traced_run.delivery.queue import BATCH_SIZE, SpanQueue
from traced_run.delivery.sender import OUTAGE_NOTICE, SPOOL_RESERVE, Backoff, DeliveryThread
from traced_run.delivery.spill import OverflowSpooler, SpoolWriter
from traced_run.delivery.spool import Spool
from traced_run.delivery.stats import DeliveryStats

# Its fork hooks must be in place before the app can fork: imported by the delivery thread,
# a fork under way meanwhile would run none of its before-fork hooks but its after-fork ones.
from traced_run.transport import connections  # noqa: F401

__all__ = ["BATCH_SIZE", "OUTAGE_NOTICE", "Delivery", "DeliveryProcessor"]

FORK_WAIT = 10.0
"""Longest a fork waits for the delivery thread to finish importing its modules."""


class Delivery:
    """Wires the parts of one process's delivery together; its own fields
    (``_thread``) are guarded by the queue's lock."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        """Monotonic seconds for the queue, the back-off and the exit bound (the unit tests
        move a fake one on; waits stay real, bounded by what it says is left)."""
        self._endpoint = settings.traces_endpoint or ""
        self.spool = Spool.of(settings)
        self.interrupt: Callable[[str], object] | None = None
        """Set by the pipeline: ends the open spans of agent runs when the process leaves."""
        self.open_root: Callable[[int], ReadableSpan | None] | None = None
        """Set by the pipeline: a trace's open root ended as interrupted (see ``open_roots``)."""
        self._build()
        os.register_at_fork(before=self._before_fork, after_in_child=self._after_fork_in_child)

    def _build(self) -> None:
        """Fresh parts: at start, and in a forked child, which starts empty (it
        never re-sends its parent's queue), starts its own thread when it has
        spans, and is flushed by the ``os._exit`` wrapper it inherits."""
        self.stats = DeliveryStats(self._settings, self.spool)
        open_roots = OpenRoots(self._settings, self.spool, self._open_root)
        self._spool_writer = SpoolWriter(self._settings, self.spool, self.stats,
                                         lambda: self._queue.set_spool_idle(False), open_roots)
        self._overflow = OverflowSpooler(self._spool_writer, BATCH_SIZE)
        self._queue = SpanQueue(self._settings.queue_size, self._overflow, self._start_locked,
                                clock=self._clock)
        self._backoff = Backoff(self._clock)
        self._loaded = threading.Event()
        self._thread: threading.Thread | None = None

    def _open_root(self, trace_id: int) -> ReadableSpan | None:
        return self.open_root(trace_id) if self.open_root is not None else None

    def _after_fork_in_child(self) -> None:
        self.spool.let_go_inherited()
        self._build()

    def _before_fork(self) -> None:
        """A fork while the delivery thread imports (the exporter, OpenInference)
        gives the child half-imported modules whose import locks no thread of the
        child will release: the child's own delivery thread then fails or hangs,
        and its exit waits the whole bound. Seen with a multiprocessing fork pool
        made right after ``import pydantic_ai``; gunicorn --preload forks as early."""
        if self._thread is not None:
            self._loaded.wait(FORK_WAIT)

    def submit(self, span: ReadableSpan) -> None:
        if not self._queue.put(span):
            self.stats.dropped()

    def start(self) -> None:
        """Start the delivery thread now: importing the exporter is then done
        before the first batch is due, and a spool left by earlier processes is sent."""
        with self._queue.lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None:
            loop = DeliveryThread(self._settings, self._queue, self._spool_writer, self.stats, self._backoff,
                                  self._loaded)
            self._thread = threading.Thread(target=loop.run, name="traced-run-delivery", daemon=True)
            self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Send what is queued now; True when all of it was handled within ``timeout``."""
        return self._queue.flush(timeout)

    def close(self, why: str = "process exit") -> None:
        """End what is still open of agent runs (``why`` says what cut them off), deliver
        or spool what is queued within ``exit_timeout``; say what happened."""
        if self._queue.is_closed():
            return
        if self.interrupt is not None:
            self.interrupt(why)
        hanging = self._backoff.hanging(self._settings.exit_timeout)
        if hanging is None:
            self._backoff.retry_now()
        # Leaving an MLflow known to hang: no time for it, the delivery thread spools what it takes.
        deadline = self._queue.begin_closing(self._settings.exit_timeout if hanging is None else 0.0)
        if deadline is None:
            return
        with self._queue.lock:
            started = self._thread is not None
        if started and hanging is None:
            hanging = self._deliver_until(deadline - SPOOL_RESERVE)
        reserve_end = self._clock() + SPOOL_RESERVE
        left = self._queue.close(SPOOL_RESERVE)
        unsent = self._overflow.close(max(0.0, reserve_end - self._clock())) + left.unsent
        if left.posted or unsent:
            # The delivery thread did not finish in time, or MLflow hangs: keep the rest
            # from this thread. A batch that was mid-send may reach MLflow twice;
            # MLflow stores a re-sent span once.
            if hanging is None:
                self.stats.timed_out()
            else:
                self.stats.left_hanging(hanging)
            from traced_run.spans import redact

            # On the thread that is leaving: its redaction ends with the exit bound, as the rest does
            # (redaction reads the real clock: what is left of the bound is counted from now).
            with redact.until(time.monotonic() + max(deadline, reserve_end) - self._clock()):
                if left.posted:
                    self._spool_writer.keep(left.posted, unanswered=left.waited)
                if unsent:
                    self._spool_writer.keep(unsent)
        self.stats.say_exit_line(self._endpoint)

    def _deliver_until(self, until: float) -> str | None:
        """Wait until ``until`` for what is queued to be handled; but an MLflow that has
        answered no post yet is not waited for once its post has waited ``exit_timeout``
        since it was sent: it hangs (why, returned). A post sent at exit (the process
        knew nothing of MLflow yet) gets the whole bound."""
        patience = self._settings.exit_timeout
        while True:
            hanging = self._backoff.hanging(patience)
            if hanging is not None:
                return hanging
            left = until - self._clock()
            more = self._backoff.patience_left(patience)
            # A post past its patience while MLflow answered the one before is slow, not hanging:
            # it gets what is left of the bound, no more.
            wait = left if more is None or more <= 0 else min(left, more)
            if self._queue.flush(max(0.0, wait)) or wait >= left:
                return None

    def install_exit_hooks(self) -> None:
        # Another way out waits for a delivery under way: its bound, and a second for the spool.
        exits.install(self.close, self._settings.exit_timeout + 1.0, self._cut_off)

    def _cut_off(self) -> None:
        """From a signal handler, so no lock: a server may be killed once its grace time is
        over, and what ended of its open runs must be on its way by then."""
        self._queue.cut_off = True


class DeliveryProcessor(SpanProcessor):
    """Hands each finished span to the delivery queue; costs the app an append."""

    def __init__(self, delivery: Delivery) -> None:
        self._delivery = delivery

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self._delivery.submit(span)

    def shutdown(self) -> None:
        self._delivery.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._delivery.flush(timeout_millis / 1000)
