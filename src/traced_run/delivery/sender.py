"""The delivery thread: takes batches from the queue, posts them, backs off
while MLflow does not take them, and sends the spool back when it does.

Everything here but ``Backoff`` is the delivery thread's own (the sender, the
outage it reports, the unreadable files it told of). ``Backoff`` is written by
that thread, and read and reset by the exit path, so it has its own lock.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from opentelemetry.sdk.trace import ReadableSpan

from traced_run import report
from traced_run.config.settings import Settings
from traced_run.delivery import links
from traced_run.delivery.queue import SpanQueue
from traced_run.delivery.spill import SpoolWriter, traces_of
from traced_run.delivery.spool import SpoolRefused, Target
from traced_run.delivery.stats import DeliveryStats
from traced_run.report import mask_url
from traced_run.transport import NO_ANSWER

if TYPE_CHECKING:
    from traced_run.delivery.export import Outcome, Sender

BATCH_DELAY = 1.0
"""Seconds a partial batch waits for more spans before it is sent anyway."""
BACKOFF = (0.25, 0.5, 1.0)
"""Seconds between attempts while MLflow does not take batches: short, so a
process finds MLflow again within about a second of its return (plus the
attempt), and never more than one attempt a second while it is down."""
SPOOL_RESERVE = 0.25
"""Part of the exit bound kept for writing what is left to the spool."""
CUT_MARGIN = 0.1
"""An attempt that ended with less than this left of the exit bound was cut short by it."""
OUTAGE_NOTICE = 10.0
"""Seconds MLflow may take no batch before a running process says so: a
shorter outage, or one a process exits during, is told only by the exit line."""


class Backoff:
    """When MLflow may be asked again, since when it has not taken a batch, and
    whether it hangs: what the exit path needs to know to leave at once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._failures = 0
        self.outage_since: float | None = None
        self.outage_wall = 0.0
        self._unanswered: str | None = None
        """Why the last attempt that ended got no answer in time; None once one ends otherwise."""
        self._answered = False
        """The last attempt that ended got an answer (of any status): MLflow is slow at worst."""
        self._asked_at: float | None = None
        """When the post in flight was sent."""
        self._asked_until = 0.0
        """Until when MLflow asked not to be asked again (its last ``Retry-After``)."""

    def down(self) -> bool:
        with self._lock:
            return self._clock() < self._down_until

    def remaining(self) -> float:
        """Seconds until MLflow may be asked again."""
        with self._lock:
            return max(0.0, self._down_until - self._clock())

    def up(self) -> None:
        with self._lock:
            self._failures = 0
            self._down_until = self._asked_until = 0.0
            self.outage_since = None

    def failed(self, retry_after: float | None = None) -> None:
        """An attempt failed; MLflow is asked again after the back-off, or after the wait
        its answer asked for (``Retry-After``) when that is longer."""
        with self._lock:
            now = self._clock()
            wait = max(BACKOFF[min(self._failures, len(BACKOFF) - 1)], retry_after or 0.0)
            self._down_until = now + wait
            self._asked_until = now + retry_after if retry_after is not None else 0.0
            self._failures += 1
            if self.outage_since is None:
                self.outage_since = now
                self.outage_wall = time.time()

    def retry_now(self) -> None:
        """Leaving is a process's last chance to send: MLflow gets one more attempt even
        mid-backoff (it may have recovered since), but not before the time it asked for."""
        with self._lock:
            self._down_until = self._asked_until

    def wait_asked(self, within: float) -> bool:
        """On the delivery thread while leaving: wait out what is left of the wait MLflow
        asked for, when it ends within ``within`` seconds. True when MLflow may be asked now."""
        left = self.remaining()
        if left <= 0:
            return True
        if left >= within:
            return False
        self._sleep(left)  # the exit bound covers it; no lock is held
        return True

    def wait_named(self, within: float, *, leaving: bool) -> None:
        """When ``leaving``: wait out the time MLflow's last answer named (``Retry-After``) if it
        ends within ``within`` seconds: MLflow is up, and a batch it sent to the spool may go then."""
        with self._lock:
            named = leaving and self._clock() < self._asked_until
        if named:
            self.wait_asked(within)

    def outage(self, at_least: float) -> float | None:
        """The wall-clock start of an outage that has lasted ``at_least`` seconds."""
        with self._lock:
            since = self.outage_since
            return self.outage_wall if since is not None and self._clock() - since >= at_least else None

    @contextlib.contextmanager
    def asking(self) -> Iterator[None]:
        """Around a post: the exit path sees how long MLflow has left it unanswered."""
        with self._lock:
            self._asked_at = self._clock()
        try:
            yield
        finally:
            with self._lock:
                self._asked_at = None

    def heard(self, outcome: Outcome) -> None:
        """A post ended: answered (with any status), with no answer within its
        timeout (MLflow hangs), or failed at once (refused: it does not hang)."""
        unanswered = outcome.status is None and outcome.reason.startswith(NO_ANSWER)
        with self._lock:
            self._unanswered = outcome.reason if unanswered else None
            self._answered = outcome.delivered or outcome.status is not None

    def hanging(self, patience: float) -> str | None:
        """Why MLflow is not worth waiting for at exit, if it is not: the last post
        went unanswered for its whole timeout (none ended otherwise since), or the
        post in flight has waited ``patience`` while the last one got no answer
        either (one that did says MLflow answers, if slowly: it gets the bound)."""
        with self._lock:
            if self._unanswered is not None:
                return self._unanswered
            waited = None if self._asked_at is None or self._answered else self._clock() - self._asked_at
        if waited is not None and waited >= patience:
            return f"no answer from MLflow within {waited:.1f} s"
        return None

    def patience_left(self, patience: float) -> float | None:
        """Seconds until the post in flight has waited ``patience``; None when none is."""
        with self._lock:
            return None if self._asked_at is None else self._asked_at + patience - self._clock()


class DeliveryThread:
    def __init__(self, settings: Settings, queue: SpanQueue, spool_writer: SpoolWriter, stats: DeliveryStats,
                 backoff: Backoff, loaded: threading.Event) -> None:
        self._settings = settings
        self._endpoint = settings.traces_endpoint or ""
        self._queue = queue
        self._spool_writer = spool_writer
        self._spool = spool_writer.spool
        self._stats = stats
        self._backoff = backoff
        self._loaded = loaded
        self._sender: Sender | None = None
        self._linker: links.Linker | None = None
        self._unreadable_told = 0

    def run(self) -> None:
        try:
            from traced_run.delivery.export import Sender
            from traced_run.spans import enrich
            from traced_run.transport import import_network_modules

            import_network_modules()
            enrich.prepare(self._settings)
            # The git checkout is read here, off the app's threads, and before a fork may go
            # ahead: a child forked mid-read inherits hashlib's state mid-use.
            links.version_of(self._settings)
        finally:
            self._loaded.set()  # a fork may go ahead now (see Delivery._before_fork)
        # The experiment is looked up (and created) by the first post, not here: a
        # process that sends nothing must not create one.
        self._sender = Sender(self._settings)
        self._sender.on_send = self._queue.posting
        self._linker = links.Linker(self._settings, self._sender.resolve)
        more_spooled = True  # a spool left by earlier processes goes first
        while True:
            batch = self._queue.take(0 if more_spooled else self._wait())
            if batch is None:
                return
            more_spooled = False
            try:
                spool_turn = not batch
                if batch:
                    self._deliver(batch)
                    batch = []  # handled: a failure sending the spool below loses none of it
                    spool_turn = self._spool_turn_after_batch()
                if spool_turn:
                    more_spooled = self._send_spooled_one()
                    self._queue.set_spool_idle(not more_spooled)
            except Exception as error:  # a bug of ours or a library's must not stop delivery
                self._stats.broke(len(batch), f"{type(error).__name__}: {error}")
            self._queue.done()
            self._tell_long_outage()

    def _wait(self) -> float:
        """How long a partial batch waits; while backing off, until MLflow may be asked again
        (the spool's turn then finds it back as soon as it may)."""
        return min(BATCH_DELAY, self._backoff.remaining() or BATCH_DELAY)

    def _spool_turn_after_batch(self) -> bool:
        """Under steady traffic the queue is never idle: after each batch, one spooled batch goes too
        (unless MLflow is down or the queue runs high), so the spool drains while the app runs."""
        return not self._queue.spool_is_idle() and not self._backoff.down() and not self._queue.high()

    def _attempt_timeout(self) -> float:
        return self._queue.attempt_timeout(self._settings.timeout, SPOOL_RESERVE)

    def _deliver(self, batch: list[ReadableSpan]) -> None:
        from traced_run.delivery.export import target_of

        payload = self._encode(batch)
        if not batch:  # each of its spans was dropped as unencodable (said and counted)
            return
        timeout = self._attempt_timeout()
        if self._queue.leaving() and self._backoff.wait_asked(timeout):
            timeout = self._attempt_timeout()
        if self._backoff.down() or self._queue.high() or timeout <= 0:
            if timeout <= 0:
                self._stats.timed_out()
            with self._queue.hold() as held:
                if held:
                    self._spool_writer.keep(batch, payload)
            return
        self._spool_writer.open_roots.leaving(batch)  # a spooled batch is told by keep()
        target = target_of(self._settings)
        outcome = self._post(payload, target, timeout)
        with self._queue.hold() as held:
            if not held:  # close() took the batch over while it was posted: the answer is not ours
                return
            if outcome.delivered:
                self._stats.delivered(len(batch) - sum(part.spans for part in outcome.rejected))
                for part in outcome.rejected:
                    self._spool_writer.set_aside(part.payload, part.spans, 1, part.outcome,
                                                 self._queue.leaving())
                self._backoff.up()
                self._link(payload, target, outcome, len(batch), len(traces_of(batch)))
            elif outcome.invalid:
                self._spool_writer.set_aside(payload, len(batch), len(traces_of(batch)), outcome,
                                       self._queue.leaving())
            else:
                self._failed(outcome)
                unanswered = self._queue.posted() and outcome.status is None \
                    and outcome.reason.startswith(NO_ANSWER)
                self._spool_writer.keep(batch, payload, timeout if unanswered else None)

    def _encode(self, batch: list[ReadableSpan]) -> bytes:
        """``encode``; a span it drops is counted and leaves the batch, so that what follows
        (counts, the spool) is of the spans sent. The batch is the queue's in flight, which
        close() may take over: it changes under the queue's lock."""
        from traced_run.delivery.export import encode

        dropped: list[ReadableSpan] = []
        payload = encode(batch, self._settings, dropped)
        if dropped:
            self._stats.unencodable(dropped)
            gone = {id(span) for span in dropped}
            kept = [span for span in batch if id(span) not in gone]
            with self._queue.lock:
                batch[:] = kept
        return payload

    def _post(self, payload: bytes, target: Target, timeout: float) -> Outcome:
        assert self._sender is not None
        with self._backoff.asking():
            outcome = self._sender.post_by_trace(payload, target, timeout)
        self._backoff.heard(outcome)
        return outcome

    def _link(self, payload: bytes, target: Target, outcome: Outcome, spans: int, traces: int) -> None:
        """The links of a batch MLflow took; one it did not answer sends the batch again later."""
        assert self._linker is not None
        why = self._linker.link(payload, target, [part.payload for part in outcome.rejected],
                                self._attempt_timeout())
        if why is None:
            return
        self._backoff.failed()
        try:
            self._spool.put(target, spans, traces, payload)
        except OSError as error:
            report.say(f"traces are not linked to their agent version or run ({why}), and their batch could "
                       f"not be kept to link them later: {error}")

    def _failed(self, outcome: Outcome) -> None:
        # An attempt the exit bound cut short says nothing about MLflow: the reason must say so.
        cut = self._queue.leaving() and outcome.status is None and outcome.reason.startswith(NO_ANSWER) \
            and self._attempt_timeout() <= CUT_MARGIN
        self._stats.failed(outcome.reason, cut_by_exit_bound=cut)
        self._backoff.failed(outcome.retry_after)

    def _tell_long_outage(self) -> None:
        """One line per outage (a timeout, then a reset, then a 503 are one
        outage), once it has lasted OUTAGE_NOTICE; the clock time keeps the
        line of a later outage from reading as a repeat."""
        started = self._backoff.outage(OUTAGE_NOTICE)
        if started is None or self._queue.leaving():
            return
        shown = time.strftime("%H:%M:%S", time.localtime(started))
        report.say(f"cannot deliver traces to {mask_url(self._endpoint)} since {shown} "
                   f"({self._stats.problem}); keeping them in {self._spool.directory} and retrying in "
                   f"the background")
        self._stats.outage_told()

    def _send_spooled_one(self) -> bool:
        """Send one spooled batch, if MLflow is taking batches; the queue keeps
        priority. True when it was sent and there may be more."""
        self._backoff.wait_named(self._attempt_timeout(), leaving=self._queue.leaving())
        # No time left (leaving a hanging MLflow at once): a claim would only be posted to fail.
        no_time = self._attempt_timeout() <= 0
        if self._backoff.down() or self._sender is None or self._queue.is_closed() or no_time:
            return False
        try:
            with contextlib.closing(self._spool.send(self._endpoint, lambda batch: self._post(
                    batch.payload, batch.target, self._attempt_timeout()))) as sending:
                for batch, outcome, aside in sending:
                    # a batch given back to the spool is still this process's
                    if outcome.delivered or aside is not None:
                        self._stats.finished_spooled(batch.name, batch.spans, outcome.delivered)
                    if outcome.delivered:
                        self._backoff.up()
                        self._link(batch.payload, batch.target, outcome, batch.spans, batch.traces)
                        if aside is not None:  # some of its traces, rejected alone, went aside
                            self._spool_writer.rejected(sum(part.spans for part in outcome.rejected), aside,
                                                  outcome.rejected[0].outcome, self._queue.leaving())
                        return True
                    if aside is not None:
                        self._spool_writer.rejected(batch.spans, aside, outcome, self._queue.leaving())
                        return True
                    self._failed(outcome)
            return False
        except SpoolRefused as error:  # fail-open: this process sends and keeps without the spool
            report.say(str(error))
            return False
        finally:
            self._tell_unreadable()

    def _tell_unreadable(self) -> None:
        spool = self._spool
        if spool.unreadable > self._unreadable_told:
            self._unreadable_told = spool.unreadable
            report.say(f"set aside {spool.unreadable} files in {spool.directory} that were no "
                       f"readable batch, in {spool.rejected} (first: {spool.unreadable_why})")
