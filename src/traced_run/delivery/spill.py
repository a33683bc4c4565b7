"""The spill to disk: writing batches to the spool (from the delivery thread,
the spill thread and the exit path alike), and the spill thread that takes
the queue's oldest batches while the delivery thread is held by a post.

``SpoolWriter`` keeps no state of its own (what it wrote is counted in the
stats). ``OverflowSpooler``'s backlog and its busy flag are guarded by ``OverflowSpooler._lock``;
it is fed by the app's threads (under the queue's lock, taken first), drained
by the spill thread, and emptied by the exit path.
"""

from __future__ import annotations

import errno
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from opentelemetry.sdk.trace import ReadableSpan

from traced_run import report
from traced_run.config.settings import Settings
from traced_run.delivery.open_roots import OpenRoots
from traced_run.delivery.spool import Spool, Target
from traced_run.delivery.stats import DeliveryStats
from traced_run.transport import printable

if TYPE_CHECKING:
    from traced_run.delivery.export import Outcome


def trace_of(span: ReadableSpan) -> int:
    return span.context.trace_id if span.context else 0


def traces_of(spans: Sequence[ReadableSpan]) -> frozenset[int]:
    return frozenset(span.context.trace_id for span in spans if span.context)


def spool_write_problem(error: OSError, directory: Path) -> str:
    """Why the spool could not be written, named as what to fix: a full disk or a used-up
    quota is no network problem, and says which directory's disk it is."""
    if error.errno == errno.ENOSPC:
        return f"the disk holding the spool {directory} is full (no space left on device)"
    if error.errno == errno.EDQUOT:
        return f"this user's disk quota for the spool {directory} is used up (disk quota exceeded)"
    return f"cannot write the spool {directory}: {printable(str(error.strerror or error)).lower()}"


class SpoolWriter:
    """Writes batches to the spool, and sets aside the ones MLflow rejects."""

    def __init__(self, settings: Settings, spool: Spool, stats: DeliveryStats,
                 spooled: Callable[[], None], open_roots: OpenRoots) -> None:
        self._settings = settings
        self.spool = spool
        self.open_roots = open_roots
        """Told of every batch that leaves the process, here or posted (``DeliveryThread``)."""
        self._stats = stats
        self._spooled = spooled
        """Called once a batch is in the spool: the delivery thread has some to send again."""

    def keep(self, batch: Sequence[ReadableSpan], payload: bytes | None = None,
             unanswered: float | None = None) -> None:
        """Write the batch to the spool, in parts if it is larger than the
        bound. Until each part is written its spans count as unwritten: when
        the exit bound runs out meanwhile, the exit line says so, since the
        writing thread then ends with the process. ``unanswered``: the batch
        was posted and its answer did not come within that many seconds."""
        from traced_run.delivery.export import encode, target_of

        self.open_roots.leaving(batch)
        target = target_of(self._settings)
        self._stats.writing(len(batch))
        left = len(batch)
        try:
            if payload is None:
                dropped: list[ReadableSpan] = []
                payload = encode(batch, self._settings, dropped)
                self._stats.unencodable(dropped)
            for spans, piece in self._pieces(batch, payload):
                self._put(target, spans, piece, unanswered)
                left -= len(spans)
        except Exception as error:  # encoding a part: counted, never silent
            self._stats.unwritten(left, f"{type(error).__name__}: {error}")

    def _put(self, target: Target, spans: Sequence[ReadableSpan], piece: bytes,
             unanswered: float | None) -> None:
        traces = traces_of(spans)
        try:
            name, orphans = self.spool.put(target, len(spans), len(traces), piece)
        except OSError as error:
            self._stats.unwritten(len(spans), spool_write_problem(error, self.spool.directory))
            return
        self._stats.written(len(spans), name, traces, orphans, unanswered)
        if name is not None:
            self._spooled()

    def _pieces(self, batch: Sequence[ReadableSpan],
                payload: bytes) -> Iterator[tuple[Sequence[ReadableSpan], bytes]]:
        """The batch in parts the spool's bound holds, oldest first: a part
        larger than the whole bound would be removed by it at once, so a batch
        is halved (between traces, while it holds more than one) until its parts
        fit, and only a single span larger than the bound is dropped."""
        from traced_run.delivery.export import encode

        if len(batch) == 1 or self.spool.fits(len(payload)):
            yield batch, payload
            return
        for part in _halves(batch):
            yield from self._pieces(part, encode(part, self._settings))

    def set_aside(self, payload: bytes, spans: int, traces: int, outcome: Outcome, leaving: bool) -> None:
        from traced_run.delivery.export import target_of

        aside = self.spool.put_rejected(target_of(self._settings), spans, traces, payload, outcome.reason)
        self.rejected(spans, aside, outcome, leaving)

    def rejected(self, spans: int, aside: Path, outcome: Outcome, leaving: bool) -> None:
        """Said when it happens (a running service must learn of it), or, when
        leaving, by the exit line."""
        if self._stats.rejected(spans, outcome.status, outcome.reason, leaving):
            report.say(f"MLflow rejected a batch of {report.counted(spans, 'span')} ({outcome.reason}); "
                       f"set aside in {aside}")


def _halves(batch: Sequence[ReadableSpan]) -> tuple[Sequence[ReadableSpan], Sequence[ReadableSpan]]:
    """Two parts of about half the spans each, cut between traces when it holds more than one."""
    order: dict[int, list[ReadableSpan]] = {}
    for span in batch:
        order.setdefault(trace_of(span), []).append(span)
    if len(order) == 1:
        half = len(batch) // 2
        return batch[:half], batch[half:]
    first: list[ReadableSpan] = []
    traces = list(order.values())
    while traces and (not first or len(first) + len(traces[0]) <= len(batch) // 2):
        first.extend(traces.pop(0))
    return first, [span for trace in traces for span in trace]


class OverflowSpooler:
    def __init__(self, spool_writer: SpoolWriter, batch_size: int) -> None:
        self._spool_writer = spool_writer
        self._batch_size = batch_size
        self._lock = threading.Condition()
        self._batches: deque[list[ReadableSpan]] = deque()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def room(self, queue_size: int) -> bool:
        """Whether the spill thread is less far behind than the queue holds."""
        with self._lock:
            return len(self._batches) * self._batch_size < queue_size

    def offer(self, batch: list[ReadableSpan]) -> bool:
        """Hand a batch to the spill thread; False once closed (the exit path keeps what is left)."""
        with self._lock:
            if self._closed:
                return False
            self._batches.append(batch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="traced-run-spill", daemon=True)
                self._thread.start()
            self._lock.notify_all()
            return True

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: bool(self._batches) or self._closed)
                if self._closed:  # the exit path took what was left
                    return
                batch = self._batches.popleft()
                self._busy = True
            try:
                self._spool_writer.keep(batch)
            finally:
                with self._lock:
                    self._busy = False
                    self._lock.notify_all()

    def close(self, wait: float) -> list[ReadableSpan]:
        """Stop, once the batch being written is (or ``wait`` is over); what was not written yet."""
        with self._lock:
            self._lock.wait_for(lambda: not self._busy, timeout=wait)
            self._closed = True
            left = [span for batch in self._batches for span in batch]
            self._batches.clear()
            return left
