"""The accounting of one process's spans, and the exit line written from it.

Every thread writes here (the app's threads count drops, the delivery and
spill threads count what they sent, kept, set aside or lost, the exit path
counts what it kept and writes the line), so every field, ``problem``
included, is guarded by ``DeliveryStats._lock`` and read or written only by the
methods below. No other lock is taken while it is held.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry.sdk.trace import ReadableSpan

from traced_run import report
from traced_run.config.settings import Settings
from traced_run.delivery.spool import AGE, BOUND, Spool
from traced_run.report import counted, mask_url

STILL_TAKING = "reached while MLflow was still taking batches (it took the one before)"


class DeliveryStats:
    def __init__(self, settings: Settings, spool: Spool) -> None:
        self._settings = settings
        self._spool = spool
        self._lock = threading.Lock()
        self._problem: str | None = None
        """Why the last batch was not delivered (what the exit line names)."""
        self._answered = False
        """The last attempt that ended took its batch: MLflow was answering."""
        self._delivered = 0
        self._own: dict[str, tuple[int, frozenset[int]]] = {}
        """This process's batches in the spool, by name: spans, trace ids."""
        self._unanswered: dict[str, float] = {}
        """Of those, the ones posted and left unanswered (MLflow may have them), by name: seconds waited."""
        self._sent_later = 0
        self._rejected = 0
        self._rejected_told = 0
        self._statuses: set[int] = set()
        self._refusal = ""
        """Why MLflow refused the first batch it refused without an HTTP status (its experiment deleted)."""
        self._dropped = 0
        self._oversized = 0
        """Spans dropped as each alone larger than the spool's bound."""
        self._orphans_dropped = 0
        self._unwritten = 0
        """Spans a thread is writing to the spool."""
        self._lost = 0
        self._lost_why: str | None = None
        """Why spans were lost: a cause of ours (a full disk), not MLflow's."""
        self._unencodable: set[tuple[int, int]] = set()  # a set: a batch may be encoded twice
        self._outage_told = False

    # -- what happened ------------------------------------------------------------------------

    @property
    def problem(self) -> str | None:
        with self._lock:
            return self._problem

    def failed(self, reason: str, *, cut_by_exit_bound: bool = False) -> None:
        """MLflow did not take a batch: ``reason`` is now the problem; unless the exit
        bound cut the attempt short, which says nothing about MLflow: that is the problem then."""
        with self._lock:
            self._problem = self._exit_bound_reason() if cut_by_exit_bound else reason
            self._answered = False

    def lost(self, spans: int, why: str) -> None:
        """Spans gone for a reason of ours (an encoding error, a spool that cannot be written)."""
        with self._lock:
            self._lost += spans
            self._lost_why = why

    def broke(self, spans: int, why: str) -> None:
        """A bug of ours or a library's stopped the delivery thread's turn: ``why`` is the problem."""
        with self._lock:
            self._lost += spans
            self._problem = why

    def timed_out(self) -> None:
        """The exit bound ran out with spans still in this process's hands."""
        with self._lock:
            if self._problem is None:
                self._problem = self._exit_bound_reason()

    def left_hanging(self, why: str) -> None:
        """The exit path did not wait for MLflow, which hangs (``why``): that is the problem."""
        with self._lock:
            self._problem = why
            self._answered = False

    def _exit_bound_reason(self) -> str:
        """What to say of the exit bound running out (lock held): true to what MLflow did."""
        bound = f"exit_timeout={self._settings.exit_timeout:g}s"
        if self._answered:
            return f"{bound} {STILL_TAKING}; set TRACED_RUN_EXIT_TIMEOUT higher to wait longer at exit"
        return f"no answer from MLflow within {bound}"

    def delivered(self, spans: int) -> None:
        with self._lock:
            self._delivered += spans
            self._answered = True

    def dropped(self) -> None:
        with self._lock:
            self._dropped += 1

    def unencodable(self, spans: Sequence[ReadableSpan]) -> None:  # each said when dropped (export.encode)
        with self._lock:
            self._unencodable.update((s.context.trace_id, s.context.span_id) for s in spans if s.context)

    def writing(self, spans: int) -> None:
        """Spans a thread starts writing to the spool: said at exit when it never finished."""
        with self._lock:
            self._unwritten += spans

    def written(self, spans: int, name: str | None, traces: frozenset[int], orphans: int,
                unanswered: float | None = None) -> None:
        """One part written (``name``), or dropped as larger than the bound (None); one step with
        the unwritten count, so the exit line never counts a part twice. ``unanswered``: the
        seconds its post waited for an answer that did not come."""
        with self._lock:
            self._unwritten -= spans
            self._orphans_dropped += orphans
            if name is None:
                self._oversized += spans
                return
            self._own[name] = (spans, traces)
            if unanswered is not None:
                self._unanswered[name] = unanswered

    def unwritten(self, spans: int, why: str) -> None:
        """Spans that were being written and never will be."""
        with self._lock:
            self._unwritten -= spans
            self._lost += spans
            self._lost_why = why

    def finished_spooled(self, name: str, spans: int, delivered: bool) -> None:
        """A spooled batch was sent, or set aside, by this process; one of ours counts as sent later."""
        with self._lock:
            if delivered:
                self._answered = True
            if self._own.pop(name, None) is not None and delivered:
                self._sent_later += spans

    def rejected(self, spans: int, status: int | None, reason: str, leaving: bool) -> bool:
        """Counted; True when it is to be said now (a running service must learn of it),
        False when the exit line will say it."""
        with self._lock:
            self._rejected += spans
            if status is not None:
                self._statuses.add(status)
            else:
                self._refusal = self._refusal or reason
            if not leaving:
                self._rejected_told += spans
            return not leaving

    def outage_told(self) -> None:
        with self._lock:
            self._outage_told = True

    # -- the exit line ------------------------------------------------------------------------

    def exit_line(self, endpoint: str) -> str | None:
        """Of this process's own spans only: batches of other processes it sent
        from the spool are theirs to account for (they said where they kept them).
        None when all was delivered. Reads the spool under the lock: a directory
        listing, taken at exit, that no other thread waits for long."""
        with self._lock:
            waiting, removed = self._spool.statuses(self._own)
            parts = self._not_delivered(endpoint, waiting, removed) + _gone(self, removed)
        return "; ".join(parts) if parts else None

    def _not_delivered(self, endpoint: str, waiting: set[str], removed: dict[str, str]) -> list[str]:
        own = self._own
        posted = {name: self._unanswered[name] for name in waiting if name in self._unanswered}
        unsent = waiting - posted.keys()
        # Gone from the spool but neither removed by the bound nor sent by us: another traced
        # process or `traced-run flush` sent it (one that set it aside said so itself).
        sent_later = self._sent_later + sum(spans for name, (spans, _) in own.items()
                                            if name not in waiting and name not in removed)
        where = mask_url(endpoint)
        why = self._problem or f"the queue ran past half of queue_size={self._settings.queue_size}"
        parts = []
        if unsent:
            parts.append(f"{_spans_of(own, unsent)} not delivered to {where} ({why}): kept in "
                         f"{self._spool.directory}; the next traced process or `traced-run flush` sends them")
        if posted:
            parts.append(_posted_part(own, posted, where, why, self._spool.directory))
        elif sent_later and not unsent and not self._outage_told:
            state = "did not take them" if self._problem else "fell behind"
            parts.append(f"{counted(sent_later, 'span')} were spooled while {where} {state} ({why}) "
                         f"and sent later")
        if self._rejected > self._rejected_told:
            statuses = ", ".join(str(status) for status in sorted(self._statuses))
            why = "; ".join(filter(None, (statuses and f"HTTP {statuses}", self._refusal)))
            untold = self._rejected - self._rejected_told
            parts.append(f"{counted(untold, 'span')} rejected by MLflow ({why}), "
                         f"set aside in {self._spool.rejected}")
        return parts

    def say_exit_line(self, endpoint: str) -> None:
        if (line := self.exit_line(endpoint)) is not None:
            report.say(line)


def _spans_of(own: dict[str, tuple[int, frozenset[int]]], names: set[str]) -> str:
    """'N spans of M traces' of the batches ``names``."""
    traces = len(frozenset().union(*(own[name][1] for name in names)))
    return f"{counted(sum(own[name][0] for name in names), 'span')} of {counted(traces, 'trace')}"


def _posted_part(own: dict[str, tuple[int, frozenset[int]]], posted: dict[str, float], where: str,
                 why: str, directory: Path) -> str:
    """Only the answer went missing: MLflow may have stored these batches, and a re-sent span is
    stored once, so they are no loss to warn of as one."""
    bound = f" ({why})" if STILL_TAKING in why else ""  # its advice holds for these too
    return (f"{_spans_of(own, set(posted))} sent to {where}: no answer within {max(posted.values()):.1f} s"
            f"{bound}; kept in {directory}; MLflow may already have stored them, re-sending is safe: "
            "the next traced process or `traced-run flush` sends them")


def _lost_part(lost: int, why: str | None, problem: str | None) -> str:
    """Lost spans, by their own cause first (a full disk): MLflow's problem is only why they were
    being kept, and leading with it would name the wrong thing to fix."""
    if why is None:
        return f"{counted(lost, 'span')} lost ({problem})"
    mlflow = f" (MLflow did not take them: {problem})" if problem else ""
    return f"{counted(lost, 'span')} lost: {why}{mlflow}"


def _gone(stats: DeliveryStats, removed: dict[str, str]) -> list[str]:
    """The exit line's parts on spans dropped or removed (stats's lock held)."""
    settings = stats._settings
    over_spool = stats._oversized + sum(stats._own[name][0] for name, cause in removed.items()
                                         if cause == BOUND)
    aged = sum(stats._own[name][0] for name, cause in removed.items() if cause == AGE)
    parts = []
    dropped = {f"queue_size={settings.queue_size} full": stats._dropped,
               f"spool over spool_max_mb={settings.spool_max_mb}": over_spool,
               "could not be encoded": len(stats._unencodable)}
    if any(dropped.values()):
        causes = ", ".join(cause for cause, spans in dropped.items() if spans)
        parts.append(f"{counted(sum(dropped.values()), 'span')} dropped ({causes})")
    if aged:
        parts.append(f"{counted(aged, 'span')} spooled more than spool_max_age="
                     f"{report.age(settings.spool_max_age)} ago were removed from the spool")
    if stats._spool.expired_spans:
        expired = counted(stats._spool.expired_spans, "span")
        parts.append(f"{expired} that ended processes spooled more than spool_max_age="
                     f"{report.age(settings.spool_max_age)} ago were removed from the spool")
    if stats._orphans_dropped:
        parts.append(f"{counted(stats._orphans_dropped, 'span')} that ended processes had spooled were "
                     f"dropped (spool over spool_max_mb={settings.spool_max_mb})")
    if stats._lost:
        parts.append(_lost_part(stats._lost, stats._lost_why, stats._problem))
    if stats._unwritten:
        parts.append(f"{counted(stats._unwritten, 'span')} may be lost (exit_timeout="
                     f"{settings.exit_timeout:g}s ran out while they were written to the spool)")
    return parts
