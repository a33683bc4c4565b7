"""Moves finished spans from the app's threads to MLflow, off those threads,
and never loses one silently.

A bounded queue feeds one daemon thread that batches, encodes and posts.
A batch MLflow does not take (refused, timeout, 5xx, 429) goes to the on-disk
spool at once, and the thread backs off before asking MLflow again; while it
waits, and when the queue runs high, batches go straight to the spool. When
MLflow answers again and the queue is idle, the spool is sent back, oldest
first, by this process or the next traced one. A batch MLflow rejects as
invalid is set aside with the reason. At exit (normal, uncaught exception,
SIGINT, SIGTERM, ``os._exit`` in a forked child) the process waits at most
``exit_timeout`` and spools whatever is left.

What the user is told, once: an outage that outlasts ``OUTAGE_NOTICE`` while
the process runs is one line then (a service that never exits must learn of
it); at exit, one line says what of this process's own spans is still in the
spool, was dropped or set aside, and, unless the outage was already told,
what was spooled and sent later. Nothing when all was delivered.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor

from traced_run import report
from traced_run.report import counted, mask_url
from traced_run.settings import Settings
from traced_run.spool import Spool, SpoolRefused, Target
from traced_run.transport import NO_ANSWER

if TYPE_CHECKING:
    from traced_run.export import Outcome, Sender

BATCH_SIZE = 512
"""Spans per request."""
BATCH_DELAY = 1.0
"""Seconds a partial batch waits for more spans before it is sent anyway."""
BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds between attempts while MLflow does not take batches."""
SPOOL_RESERVE = 0.25
"""Part of the exit bound kept for writing what is left to the spool."""
FORK_WAIT = 10.0
"""Longest a fork waits for the delivery thread to finish importing its modules."""
OUTAGE_NOTICE = 10.0
"""Seconds MLflow may take no batch before a running process says so: a
shorter outage, or one a process exits during, is told only by the exit line."""


class Delivery:
    """The queue, the delivery thread, the spool and the exit bound of one process."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._endpoint = settings.traces_endpoint or ""
        self.spool = Spool.of(settings)
        self.interrupt: Callable[[str], object] | None = None
        """Set by the pipeline: ends the open spans of agent runs when the process leaves."""
        self._reset()
        os.register_at_fork(before=self._before_fork, after_in_child=self._after_fork)

    def _reset(self) -> None:
        self._wake = threading.Condition()
        self._queue: deque[ReadableSpan] = deque()
        self._in_flight: list[ReadableSpan] = []
        self._thread: threading.Thread | None = None
        self._sender: Sender | None = None
        self._down_until = 0.0
        self._failures = 0
        self._outage_since: float | None = None
        self._outage_wall = 0.0
        self._outage_told = False
        self._closing = False
        self._closed = False
        self._deadline = 0.0
        self._flushing = 0
        self._spool_idle = False
        self._keeping = False
        self._spill: deque[list[ReadableSpan]] = deque()
        self._spill_thread: threading.Thread | None = None
        self._spilling = False
        self.problem: str | None = None
        self._answered = False
        """The last attempt that ended took its batch: MLflow was answering."""
        self.delivered = 0
        self._own: dict[str, tuple[int, frozenset[int]]] = {}
        """This process's batches in the spool, by name: spans, trace ids."""
        self._sent_later = 0
        self.rejected = 0
        self._rejected_told = 0
        self._unreadable_told = 0
        self._statuses: set[int] = set()
        self.dropped = 0
        self._oversized = 0
        """Spans dropped as each alone larger than the spool's bound."""
        self._orphans_dropped = 0
        self._unwritten = 0
        """Spans a thread is writing to the spool."""
        self.lost = 0
        self._loaded = threading.Event()

    def _before_fork(self) -> None:
        """A fork while the delivery thread imports (the exporter, OpenInference)
        gives the child half-imported modules whose import locks no thread of the
        child will release: the child's own delivery thread then fails or hangs,
        and its exit waits the whole bound. Seen with a multiprocessing fork pool
        made right after ``import pydantic_ai``; gunicorn --preload forks as early."""
        if self._thread is not None:
            self._loaded.wait(FORK_WAIT)

    def _after_fork(self) -> None:
        """A forked child starts empty (it never re-sends its parent's queue)
        and starts its own thread when it has spans; the ``os._exit`` wrapper
        it inherits flushes it (see install_exit_hooks)."""
        self._reset()

    def _flush_at_os_exit(self) -> None:
        """Flush even when the process ends with ``os._exit``, as workers of
        multiprocessing and prefork servers do. Wrapped in every traced process,
        not only in forked children: a forkserver's worker builds its pipeline
        after the fork (Python 3.11 does not preload ``__main__`` there), then
        ends with ``os._exit``."""
        real_exit = os._exit

        def exit_after_delivery(status: int) -> Any:
            self.close("os._exit")
            real_exit(status)

        os._exit = exit_after_delivery

    def submit(self, span: ReadableSpan) -> None:
        with self._wake:
            if self._closed:
                self.dropped += 1
                return
            if len(self._queue) >= self._settings.queue_size and not self._spill_oldest():
                self.dropped += 1
                return
            self._queue.append(span)
            if self._thread is None:
                self._start()
            if len(self._queue) >= BATCH_SIZE:
                self._wake.notify_all()

    def _spill_oldest(self) -> bool:
        """The queue is full while the delivery thread is held by one post (a
        hanging MLflow): hand its oldest batch to the spill thread, which writes
        it to the spool, so the app's thread neither waits nor loses it. False
        when the spill thread is as far behind as the queue holds."""
        if len(self._spill) * BATCH_SIZE >= self._settings.queue_size:
            return False
        self._spill.append([self._queue.popleft() for _ in range(min(BATCH_SIZE, len(self._queue)))])
        if self._spill_thread is None:
            self._spill_thread = threading.Thread(target=self._spill_run, name="traced-run-spill",
                                                  daemon=True)
            self._spill_thread.start()
        self._wake.notify_all()
        return True

    def _spill_run(self) -> None:
        from traced_run.export import encode

        while True:
            with self._wake:
                self._wake.wait_for(lambda: bool(self._spill) and not self._closed)
                batch = self._spill.popleft()
                self._spilling = True
            try:
                self._keep(batch, encode(batch, self._settings))
            except Exception as error:  # counted, never silent
                self.problem = f"{self.problem or 'not delivered'}; {type(error).__name__}: {error}"
                self.lost += len(batch)
            finally:
                with self._wake:
                    self._spilling = False
                    self._wake.notify_all()

    def start(self) -> None:
        """Start the delivery thread now: importing the exporter is then done
        before the first batch is due, and a spool left by earlier processes is sent."""
        with self._wake:
            if self._thread is None:
                self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="traced-run-delivery", daemon=True)
        self._thread.start()

    def _batch_due(self) -> bool:
        urgent = self._closing or self._flushing
        leaving_with_spool = self._closing and not self._spool_idle
        return len(self._queue) >= BATCH_SIZE or bool(urgent and self._queue) or leaving_with_spool

    def _settled(self) -> bool:
        """Nothing queued or in flight; when leaving, also no spooled batch MLflow would take now."""
        idle = not self._queue and not self._in_flight
        return idle and (self._spool_idle or not self._closing)

    def _run(self) -> None:
        try:
            from traced_run.export import Sender
        finally:
            self._loaded.set()  # a fork may go ahead now (see _before_fork)
        # The experiment is looked up (and created) by the first post, not here: a
        # process that sends nothing must not create one.
        self._sender = Sender(self._settings)
        more_spooled = True  # a spool left by earlier processes goes first
        while True:
            with self._wake:
                self._wake.wait_for(self._batch_due, timeout=0 if more_spooled else BATCH_DELAY)
                if self._closed:  # close() kept what was left and said so: sending on would belie it
                    return
                take = min(BATCH_SIZE, len(self._queue))
                batch = [self._queue.popleft() for _ in range(take)]
                self._in_flight = batch
            more_spooled = False
            try:
                spool_turn = not batch
                if batch:
                    self._deliver(batch)
                    batch = []  # handled: a failure sending the spool below loses none of it
                    spool_turn = self._spool_turn_after_batch()
                if spool_turn:
                    more_spooled = self._send_spooled_one()
                    self._spool_idle = not more_spooled
            except Exception as error:  # a bug of ours or a library's must not stop delivery
                self.problem = f"{type(error).__name__}: {error}"
                with self._wake:
                    self.lost += len(batch)
            with self._wake:
                self._in_flight = []
                self._wake.notify_all()
            self._tell_long_outage()

    def _spool_turn_after_batch(self) -> bool:
        """Under steady traffic the queue is never idle: after each batch, one
        spooled batch goes too (unless MLflow is down or the queue runs high),
        so the spool drains while the app runs, not only when it rests or exits."""
        high = len(self._queue) > self._settings.queue_size // 2
        return not self._spool_idle and not self._down() and not high

    def _down(self) -> bool:
        return time.monotonic() < self._down_until

    def _attempt_timeout(self) -> float:
        if self._closing:
            return max(0.0, self._deadline - time.monotonic() - SPOOL_RESERVE)
        return self._settings.timeout

    def _deliver(self, batch: list[ReadableSpan]) -> None:
        from traced_run.export import encode, target_of

        payload = encode(batch, self._settings)
        target = target_of(self._settings)
        high = len(self._queue) > self._settings.queue_size // 2
        timeout = self._attempt_timeout()
        if self._down() or high or timeout <= 0:
            if timeout <= 0 and self.problem is None:
                self.problem = self._exit_bound_reason()
            self._keep_in_flight(batch, payload)
            return
        assert self._sender is not None
        outcome = self._sender.post(payload, target, timeout)
        with self._holding_in_flight() as held:
            if not held:
                return
            if outcome.delivered:
                self.delivered += len(batch)
                self._up()
            elif outcome.invalid:
                self._set_aside(batch, payload, outcome)
            else:
                self._failed(outcome)
                self._keep(batch, payload)

    def _up(self) -> None:
        self._answered = True
        self._failures = 0
        self._down_until = 0.0
        self._outage_since = None

    def _failed(self, outcome: Outcome) -> None:
        now = time.monotonic()
        cut = self._closing and outcome.status is None and outcome.reason.startswith(NO_ANSWER) \
            and now >= self._deadline - SPOOL_RESERVE - 0.1
        # An attempt the exit bound cut short says nothing about MLflow: the reason must say so.
        self.problem = self._exit_bound_reason() if cut else outcome.reason
        self._answered = False
        self._down_until = now + BACKOFF[min(self._failures, len(BACKOFF) - 1)]
        self._failures += 1
        if self._outage_since is None:
            self._outage_since = now
            self._outage_wall = time.time()

    def _tell_long_outage(self) -> None:
        """One line per outage (a timeout, then a reset, then a 503 are one
        outage), once it has lasted OUTAGE_NOTICE; the clock time keeps the
        line of a later outage from reading as a repeat."""
        since = self._outage_since
        if since is None or self._closing or time.monotonic() - since < OUTAGE_NOTICE:
            return
        started = time.strftime("%H:%M:%S", time.localtime(self._outage_wall))
        report.say(f"cannot deliver traces to {mask_url(self._endpoint)} since {started} ({self.problem}); "
                   f"keeping them in {self.spool.directory} and retrying in the background")
        self._outage_told = True

    @contextlib.contextmanager
    def _holding_in_flight(self) -> Iterator[bool]:
        """Take the fate of the batch this thread holds (spool it, set it aside,
        count it delivered), unless close() took it over: False then, since a
        batch handled by both would be kept, or set aside, and re-sent twice.
        While held, close() waits (within SPOOL_RESERVE) and leaves it to us."""
        with self._wake:
            if self._closed:
                yield False
                return
            self._keeping = True
        try:
            yield True
        finally:
            with self._wake:
                self._keeping = False
                self._in_flight = []
                self._wake.notify_all()

    def _keep_in_flight(self, batch: Sequence[ReadableSpan], payload: bytes) -> None:
        with self._holding_in_flight() as held:
            if held:
                self._keep(batch, payload)

    def _keep(self, batch: Sequence[ReadableSpan], payload: bytes) -> None:
        """Write the batch to the spool, in parts if it is larger than the
        bound. Until each part is written its spans count as unwritten: when
        the exit bound runs out meanwhile, the exit line says so, since this
        thread then ends with the process."""
        from traced_run.export import target_of

        target = target_of(self._settings)
        with self._wake:
            self._unwritten += len(batch)
        left = len(batch)
        try:
            for spans, piece in self._pieces(batch, payload):
                self._put(target, spans, piece)
                left -= len(spans)
        except Exception as error:  # encoding a part: counted, never silent
            self.problem = f"{self.problem or 'not delivered'}; {type(error).__name__}: {error}"
            with self._wake:
                self.lost += left
        finally:
            with self._wake:
                self._unwritten -= left

    def _put(self, target: Target, spans: Sequence[ReadableSpan], piece: bytes) -> None:
        traces = frozenset(span.context.trace_id for span in spans if span.context)
        try:
            name, orphans = self.spool.put(target, len(spans), len(traces), piece)
        except OSError as error:
            self.problem = f"{self.problem or 'not delivered'}; cannot write the spool: {error.strerror}"
            with self._wake:
                self._unwritten -= len(spans)
                self.lost += len(spans)
            return
        with self._wake:  # one step with _unwritten, so the exit line never counts a part twice
            self._unwritten -= len(spans)
            self._orphans_dropped += orphans
            if name is None:
                self._oversized += len(spans)
            else:
                self._own[name] = (len(spans), traces)
                self._spool_idle = False

    def _pieces(self, batch: Sequence[ReadableSpan],
                payload: bytes) -> Iterator[tuple[Sequence[ReadableSpan], bytes]]:
        """The batch in parts the spool's bound holds, oldest first: a part
        larger than the whole bound would be removed by it at once, so a batch
        is halved until its parts fit, and only a single span larger than the
        bound is dropped."""
        from traced_run.export import encode

        if len(batch) == 1 or self.spool.fits(len(payload)):
            yield batch, payload
            return
        half = len(batch) // 2
        for part in (batch[:half], batch[half:]):
            yield from self._pieces(part, encode(part, self._settings))

    def _set_aside(self, batch: Sequence[ReadableSpan], payload: bytes, outcome: Outcome) -> None:
        from traced_run.export import target_of

        traces = len({span.context.trace_id for span in batch if span.context})
        target = target_of(self._settings)
        aside = self.spool.put_rejected(target, len(batch), traces, payload, outcome.reason)
        self._rejected(len(batch), aside, outcome)

    def _rejected(self, spans: int, aside: Path, outcome: Outcome) -> None:
        """Said when it happens (a running service must learn of it), or, when
        leaving, by the exit line."""
        with self._wake:
            self.rejected += spans
            if outcome.status is not None:
                self._statuses.add(outcome.status)
            if self._closing:
                return
            self._rejected_told += spans
        report.say(f"MLflow rejected a batch of {counted(spans, 'span')} ({outcome.reason}); "
                   f"set aside in {aside}")

    def _send_spooled_one(self) -> bool:
        """Send one spooled batch, if MLflow is taking batches; the queue keeps
        priority. True when it was sent and there may be more."""
        sender = self._sender
        if self._down() or sender is None or self._closed:
            return False
        try:
            with contextlib.closing(self.spool.send(self._endpoint, lambda batch: sender.post(
                    batch.payload, batch.target, self._attempt_timeout()))) as sending:
                for batch, outcome, aside in sending:
                    with self._wake:  # a batch given back to the spool is still this process's
                        finished = outcome.delivered or aside is not None
                        if finished and self._own.pop(batch.name, None) is not None and outcome.delivered:
                            self._sent_later += batch.spans
                    if outcome.delivered:
                        self._up()
                        return True
                    if aside is not None:
                        self._rejected(batch.spans, aside, outcome)
                        return True
                    self._failed(outcome)
            return False
        except SpoolRefused as error:  # fail-open: this process sends and keeps without the spool
            report.say(str(error))
            return False
        finally:
            self._tell_unreadable()

    def _tell_unreadable(self) -> None:
        if self.spool.unreadable > self._unreadable_told:
            self._unreadable_told = self.spool.unreadable
            report.say(f"set aside {self.spool.unreadable} files in {self.spool.directory} that were no "
                       f"readable batch, in {self.spool.rejected} (first: {self.spool.unreadable_why})")

    def flush(self, timeout: float) -> bool:
        """Send what is queued now; True when all of it was handled within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._wake:
            self._flushing += 1
            self._wake.notify_all()
            try:
                return self._wake.wait_for(self._settled, timeout=max(0.0, deadline - time.monotonic()))
            finally:
                self._flushing -= 1

    def close(self, why: str = "process exit") -> None:
        """End what is still open of agent runs (``why`` says what cut them off), deliver
        or spool what is queued within ``exit_timeout``; say what happened."""
        with self._wake:
            if self._closed:
                return
        if self.interrupt is not None:
            self.interrupt(why)
        with self._wake:
            if self._closed:
                return
            self._closing = True
            self._spool_idle = False
            # Leaving is this process's last chance to send: MLflow gets one more attempt
            # even mid-backoff (it may have recovered since); a failure spools the rest.
            self._down_until = 0.0
            self._deadline = time.monotonic() + self._settings.exit_timeout
            started = self._thread is not None
        if started:
            self.flush(max(0.0, self._deadline - time.monotonic() - SPOOL_RESERVE))
        with self._wake:
            # A batch the delivery thread is already writing to the spool stays its own.
            self._wake.wait_for(lambda: not self._keeping and not self._spilling, timeout=SPOOL_RESERVE)
            self._closed = True
            spilled = [span for batch in self._spill for span in batch]
            left = spilled + ([] if self._keeping else list(self._in_flight)) + list(self._queue)
            self._queue.clear()
            self._spill.clear()
        if left:
            self._spool_on_exit(left)
        self._summary()

    def _spool_on_exit(self, left: list[ReadableSpan]) -> None:
        """The delivery thread did not finish in time (MLflow hangs): keep the
        rest from this thread. A batch that was mid-send may reach MLflow twice;
        MLflow stores a re-sent span once."""
        from traced_run.export import encode

        if self.problem is None:
            self.problem = self._exit_bound_reason()
        try:
            self._keep(left, encode(left, self._settings))
        except Exception as error:
            self.lost += len(left)
            self.problem = f"{self.problem}; {type(error).__name__}: {error}"

    def _exit_bound_reason(self) -> str:
        bound = f"exit_timeout={self._settings.exit_timeout:g}s"
        if self._answered:
            return (f"{bound} reached while MLflow was still taking batches (it took the one before); "
                    "set TRACED_RUN_EXIT_TIMEOUT higher to wait longer at exit")
        return f"no answer from MLflow within {bound}"

    def _summary(self) -> None:
        """Of this process's own spans only: batches of other processes it sent
        from the spool are theirs to account for (they said where they kept them)."""
        with self._wake:
            own = dict(self._own)
            unwritten = self._unwritten
        waiting, removed = self.spool.fates(own)
        kept = sum(own[name][0] for name in waiting)
        traces = len(frozenset().union(*(own[name][1] for name in waiting)))
        over_spool = self._oversized + sum(own[name][0] for name in removed)
        # Gone from the spool but neither removed by the bound nor sent by us: another traced
        # process or `traced-run flush` sent it (one that set it aside said so itself).
        sent_later = self._sent_later + sum(spans for name, (spans, _) in own.items()
                                            if name not in waiting and name not in removed)
        where = mask_url(self._endpoint)
        why = self.problem or f"the queue ran past half of queue_size={self._settings.queue_size}"
        parts = []
        if kept:
            parts.append(f"{counted(kept, 'span')} of {counted(traces, 'trace')} not delivered to {where} "
                         f"({why}): kept in "
                         f"{self.spool.directory}; the next traced process or `traced-run flush` sends them")
        elif sent_later and not self._outage_told:
            parts.append(f"{counted(sent_later, 'span')} were spooled while {where} was unreachable "
                         f"({why}) and "
                         f"sent later")
        if self.rejected > self._rejected_told:
            statuses = ", ".join(str(status) for status in sorted(self._statuses))
            parts.append(f"{counted(self.rejected - self._rejected_told, 'span')} rejected by MLflow "
                         f"(HTTP {statuses}), "
                         f"set aside in {self.spool.rejected}")
        if self.dropped or over_spool:
            causes = [f"queue_size={self._settings.queue_size} full"] if self.dropped else []
            causes += [f"spool over spool_max_mb={self._settings.spool_max_mb}"] if over_spool else []
            parts.append(f"{counted(self.dropped + over_spool, 'span')} dropped ({', '.join(causes)})")
        if self.spool.expired_spans:
            parts.append(f"{counted(self.spool.expired_spans, 'span')} that ended processes spooled "
                         f"more than spool_max_age={report.age(self._settings.spool_max_age)} ago were "
                         "removed from the spool")
        if self._orphans_dropped:
            parts.append(f"{counted(self._orphans_dropped, 'span')} that ended processes had spooled "
                         f"were dropped "
                         f"(spool over spool_max_mb={self._settings.spool_max_mb})")
        if self.lost:
            parts.append(f"{counted(self.lost, 'span')} lost ({self.problem})")
        if unwritten:
            parts.append(f"{counted(unwritten, 'span')} may be lost "
                         f"(exit_timeout={self._settings.exit_timeout:g}s ran "
                         f"out while they were written to the spool)")
        if parts:
            report.say("; ".join(parts))

    def install_exit_hooks(self) -> None:
        atexit.register(self.close)
        self._flush_at_os_exit()
        try:
            previous = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _ChainedSigterm(self.close, previous))
        except ValueError:  # not the main thread: the app's own exit path still runs atexit
            pass


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
