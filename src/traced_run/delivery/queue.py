"""The in-memory queue between the app's threads and the delivery thread, its
batching, and the hand-over of what is left to the exit path.

All of it is guarded by one condition, ``SpanQueue.lock``: the app's threads
``put``, the delivery thread ``take``s a batch and ``hold``s it while it
decides its fate, the exit path ``close``s. The rule they keep: a batch the
delivery thread holds is its own (close() leaves it alone); one it has taken
but does not hold (a post in progress) is close()'s once the queue is closed,
and the delivery thread's late answer is then ignored.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from opentelemetry.sdk.trace import ReadableSpan

from traced_run.delivery.spill import OverflowSpooler, trace_of

BATCH_SIZE = 512
"""Spans per request."""


OPEN_TRACE_WAIT = 5.0
"""Seconds the ended spans of a trace whose local root is still open wait for it: a run goes
whole once its root ends (MLflow shows no part of it IN_PROGRESS from a live process), but
a long run's spans still go, and a root that never comes holds none for ever."""
CUT_OFF_POLL = 0.2
"""How often a delivery thread holding spans looks whether a SIGTERM cut the process off."""


def whole_traces(spans: deque[ReadableSpan], limit: int, ready: set[int] | None = None) -> list[ReadableSpan]:
    """Take up to ``limit`` spans from the front of ``spans``, whole traces
    only (oldest trace first), of the traces in ``ready`` only when it is given:
    MLflow stores a request all or nothing, so a span it rejects then costs only
    its own trace. A trace larger than ``limit`` alone is cut; so is the last one
    when no whole trace fits."""
    if ready is None and len(spans) <= limit:
        taken = list(spans)
        spans.clear()
        return taken
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        trace = trace_of(span)
        if ready is None or trace in ready:
            by_trace.setdefault(trace, []).append(span)
    taken = []
    for trace_spans in by_trace.values():
        if taken and len(taken) + len(trace_spans) > limit:
            continue
        taken.extend(trace_spans[:limit - len(taken)])
        if len(taken) == limit:
            break
    chosen = {id(span) for span in taken}
    kept = [span for span in spans if id(span) not in chosen]
    spans.clear()
    spans.extend(kept)
    return taken


class SpanQueue:
    def __init__(self, queue_size: int, spill: OverflowSpooler, wake_delivery: Callable[[], None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.Condition()
        self._clock = clock  # monotonic seconds; the unit tests move a fake one on (waits stay real)
        self._size = queue_size
        self._overflow = spill
        self._wake_delivery = wake_delivery
        """Starts the delivery thread when the first span comes (called under the lock)."""
        self._spans: deque[ReadableSpan] = deque()
        self._in_flight: list[ReadableSpan] = []
        self._posted_at: float | None = None
        """When the batch in flight was posted: from then on MLflow may store it, answer or not."""
        self._holding = False
        """The delivery thread is deciding the fate of its batch: close() waits, then leaves it."""
        self._flushing = 0
        self._closing = False
        self._closed = False
        self._deadline = 0.0
        """When the exit bound runs out (once closing)."""
        self._spool_idle = False
        """The delivery thread found no spooled batch MLflow would take now."""
        self._first_at: dict[int, float] = {}
        """When the delivery thread first saw each queued trace (the app's put stays an append)."""
        self.cut_off = False
        """Set, lock-free, by a SIGTERM the app's handler takes: leaving, nothing waits for a root."""

    # -- the app's threads -------------------------------------------------------------------

    def put(self, span: ReadableSpan) -> bool:
        """Queue a span; False when it is dropped (closed, or full with the spill as far behind)."""
        with self.lock:
            if self._closed:
                return False
            if len(self._spans) >= self._size and not self._spill_oldest():
                return False
            self._spans.append(span)
            self._wake_delivery()
            if len(self._spans) >= BATCH_SIZE:
                self.lock.notify_all()
            return True

    def _spill_oldest(self) -> bool:
        """The queue is full while the delivery thread is held by one post (a
        hanging MLflow): hand its oldest batch to the spill thread, which writes
        it to the spool, so the app's thread neither waits nor loses it. False
        when the spill thread is as far behind as the queue holds."""
        if not self._overflow.room(self._size):
            return False
        taken = whole_traces(self._spans, BATCH_SIZE)
        self._forget()
        return self._overflow.offer(taken)

    def _forget(self) -> None:
        """Drop what is known of traces none of whose spans is queued any more (lock held)."""
        queued = {trace_of(span) for span in self._spans}
        for trace in [trace for trace in self._first_at if trace not in queued]:
            del self._first_at[trace]

    def high(self) -> bool:
        """The queue is past half full: batches go to the spool rather than wait for MLflow."""
        with self.lock:
            return len(self._spans) > self._size // 2

    # -- the delivery thread -----------------------------------------------------------------

    def _urgent(self) -> bool:
        """Everything queued goes now, ended or not (lock held)."""
        return bool(self._closing or self._flushing or self.cut_off) or len(self._spans) >= BATCH_SIZE

    def _batch_due(self) -> bool:
        leaving_with_spool = self._closing and not self._spool_idle
        return bool(self._urgent() and self._spans) or leaving_with_spool

    def take(self, wait: float) -> list[ReadableSpan] | None:
        """The next batch once one is due or ``wait`` is over: whole traces, of the
        ended ones only unless everything is due (possibly empty: then it is the
        spool's turn); None once closed."""
        with self.lock:
            end = self._clock() + wait
            while not self._batch_due() and (left := end - self._clock()) > 0:
                # cut_off comes with no notify (a signal handler takes no lock): look again soon
                self.lock.wait(min(left, CUT_OFF_POLL) if self._spans else left)
            if self._closed:  # close() kept what was left and said so: sending on would belie it
                return None
            self._in_flight = whole_traces(self._spans, BATCH_SIZE, None if self._urgent() else self._ready())
            self._forget()
            return self._in_flight

    def _ready(self) -> set[int]:
        """Traces that go without waiting more: their local root ended, or they waited OPEN_TRACE_WAIT."""
        now = self._clock()
        ready = set()
        for span in self._spans:
            trace = trace_of(span)
            first = self._first_at.setdefault(trace, now)
            if span.parent is None or span.parent.is_remote or first <= now - OPEN_TRACE_WAIT:
                ready.add(trace)
        return ready

    @contextlib.contextmanager
    def hold(self) -> Iterator[bool]:
        """Take the fate of the batch the delivery thread took (spool it, set it
        aside, count it delivered), unless close() took it over: False then, since
        a batch handled by both would be kept, or set aside, and re-sent twice."""
        with self.lock:
            if self._closed:
                yield False
                return
            self._holding = True
        try:
            yield True
        finally:
            self.done()

    def posting(self) -> None:
        """The batch in flight goes to MLflow now (a spooled one, sent while none is, is not counted)."""
        with self.lock:
            if self._in_flight and self._posted_at is None:
                self._posted_at = self._clock()

    def posted(self) -> bool:
        """The batch in flight went to MLflow: it may have stored it, whatever came back."""
        with self.lock:
            return self._posted_at is not None

    def done(self) -> None:
        """The delivery thread is through with its batch."""
        with self.lock:
            self._holding = False
            self._in_flight = []
            self._posted_at = None
            self.lock.notify_all()

    def leaving(self) -> bool:
        with self.lock:
            return self._closing

    def is_closed(self) -> bool:
        with self.lock:
            return self._closed

    def spool_is_idle(self) -> bool:
        with self.lock:
            return self._spool_idle

    def attempt_timeout(self, timeout: float, reserve: float) -> float:
        """``timeout``, or when leaving what is left of the exit bound but ``reserve``."""
        with self.lock:
            if self._closing:
                return max(0.0, self._deadline - self._clock() - reserve)
            return timeout

    def set_spool_idle(self, idle: bool) -> None:
        with self.lock:
            self._spool_idle = idle

    # -- flush and the exit path -------------------------------------------------------------

    def _settled(self) -> bool:
        """Nothing queued or in flight; when leaving, also no spooled batch MLflow would take now."""
        idle = not self._spans and not self._in_flight
        return idle and (self._spool_idle or not self._closing)

    def flush(self, timeout: float) -> bool:
        """Wait for what is queued now to be handled; True when it was within ``timeout``."""
        deadline = self._clock() + timeout
        with self.lock:
            self._flushing += 1
            self.lock.notify_all()
            try:
                return self.lock.wait_for(self._settled, timeout=max(0.0, deadline - self._clock()))
            finally:
                self._flushing -= 1

    def begin_closing(self, exit_timeout: float) -> float | None:
        """Leaving: every batch is due now, within ``exit_timeout``; when that runs out
        (None when already closed)."""
        with self.lock:
            if self._closed:
                return None
            self._closing = True
            self._spool_idle = False
            self._deadline = self._clock() + exit_timeout
            self.lock.notify_all()
            return self._deadline

    def close(self, wait: float) -> Left:
        """Close, and return what is left for the exit path to keep: the queue,
        and the batch in flight unless the delivery thread holds it (it may
        finish within ``wait``: a batch it is writing to the spool stays its own)."""
        with self.lock:
            self.lock.wait_for(lambda: not self._holding, timeout=wait)
            self._closed = True
            in_flight = [] if self._holding else list(self._in_flight)
            unsent = list(self._spans)
            self._spans.clear()
            if self._posted_at is None or not in_flight:
                return Left([], 0.0, in_flight + unsent)
            return Left(in_flight, self._clock() - self._posted_at, unsent)


@dataclass(frozen=True)
class Left:
    """What the exit path keeps."""

    posted: list[ReadableSpan]
    """The batch in flight, posted and not answered yet: MLflow may have stored it."""
    waited: float
    """How long ``posted`` has waited for its answer."""
    unsent: list[ReadableSpan]
