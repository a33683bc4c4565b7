"""``traced-run flush``: send the spool now, from the command line.

Sends every spooled batch addressed to the configured endpoint, oldest first,
with the current credentials; stops at the first batch MLflow does not take
(it is then unreachable: the rest would fail the same way). A batch MLflow
refuses for a reason of its own (its experiment deleted, its workspace unknown,
a permanent 4xx) is set aside in ``rejected/`` with the reason, and the rest
go on; ``--set-aside`` puts those back to be sent again once the cause is
fixed. Files in the spool
that are not readable batches are set aside, once, and counted; batches older
than ``spool_max_age`` are removed, and counted.

Batches written for other endpoints (MLflow moved, a URI that was wrong) are
listed with their count and age. ``--endpoint URL`` sends those written for
URL to the configured endpoint instead (a corrected URI); ``--drop-other-endpoints``
removes them. Either way a batch goes only to the configured endpoint, the one
the current credentials are for: never to the endpoint it was written for.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from traced_run.config.settings import Settings
from traced_run.delivery.export import Outcome, Sender
from traced_run.delivery.links import Linker
from traced_run.delivery.spool import Backlog, Batch, Spool, SpoolContents, SpoolRefused
from traced_run.report import age, counted, mask_url, say
from traced_run.transport import without_userinfo


def piles(found: dict[str, Backlog]) -> list[str]:
    """Each endpoint's batches on one line: count, spans, age of the oldest."""
    now = time.time()
    return [f"{counted(pile.batches, 'batch', 'batches')} ({counted(pile.spans, 'span')}) "
            f"for {mask_url(endpoint)}, the oldest {age(now - pile.oldest)} old"
            for endpoint, pile in sorted(found.items())]


def flush(settings: Settings, written_for: str | None = None, drop_others: bool = False,
          set_aside: bool = False) -> int:
    """Returns 0 when nothing is left for this endpoint (and for ``written_for``), 1 otherwise."""
    spool = Spool.of(settings)
    endpoint = settings.traces_endpoint or ""
    shown = mask_url(endpoint)
    sender = Sender(settings)
    linker = Linker(settings, sender.resolve)
    tally = _Tally()
    try:
        if set_aside:
            print(f"put {counted(spool.put_back_set_aside(), 'set-aside batch', 'set-aside batches')} "
                  f"back in {spool.directory} to send again")
        source = _written_for(spool, endpoint, written_for) if written_for else None
        for batches_of in (None, source) if source else (None,):
            with contextlib.closing(spool.send(endpoint, lambda batch: _post(sender, linker, batch, settings),
                                               written_for=batches_of)) as sending:
                for batch, outcome, aside in sending:
                    tally.add(batch, outcome, aside)
            if tally.problem:
                break
        dropped = spool.drop_others(endpoint) if drop_others else {}
        seen = spool.survey(endpoint)
    except SpoolRefused as error:
        say(str(error))
        return 1
    except OSError as error:
        say(f"cannot use the spool {spool.directory}: {error.strerror}")
        return 1
    _summarise(settings, spool, tally, dropped, seen)
    if tally.problem:
        say(f"stopped: {shown} did not take a batch ({tally.problem})")
    left_for_source = source is not None and source in seen.others
    return 1 if seen.for_endpoint or left_for_source else 0


def _post(sender: Sender, linker: Linker, batch: Batch, settings: Settings) -> Outcome:
    """The batch, then its traces' links; a link MLflow did not answer keeps the batch in the spool."""
    outcome = sender.post_by_trace(batch.payload, batch.target, settings.timeout)
    if outcome.delivered:
        why = linker.link(batch.payload, batch.target, [part.payload for part in outcome.rejected],
                          settings.timeout)
        if why is not None:
            return Outcome(False, False, f"its traces could not be linked to their agent version: {why}")
    return outcome


@dataclass
class _Tally:
    """What one flush did: batches and spans MLflow took, batches set aside, why it stopped."""

    sent: int = 0
    spans: int = 0
    rejected: int = 0
    first_reason: str = ""
    """Why MLflow refused the first batch set aside."""
    problem: str = ""

    def add(self, batch: Batch, outcome: Outcome, aside: Path | None) -> None:
        if outcome.delivered:
            self.sent += 1
            self.spans += batch.spans - sum(part.spans for part in outcome.rejected)
            self.rejected += len(outcome.rejected)
            if outcome.rejected:
                self.first_reason = self.first_reason or outcome.rejected[0].outcome.reason
        elif aside is not None:
            self.rejected += 1
            self.first_reason = self.first_reason or outcome.reason
        else:
            self.problem = outcome.reason


def _summarise(settings: Settings, spool: Spool, tally: _Tally, dropped: dict[str, Backlog],
               seen: SpoolContents) -> None:
    """What was sent, set aside, removed and left, on stdout."""
    shown = mask_url(settings.traces_endpoint or "")
    unreadable = (f"; {spool.unreadable} files that were no readable batch set aside too "
                  f"(first: {spool.unreadable_why})") if spool.unreadable else ""
    expired = ""
    told = spool.expired_told
    if spool.expired or told.batches:
        # Those of running writers too: a pid that seems alive may be another process's now.
        expired = (f"; removed {counted(spool.expired + told.batches, 'batch', 'batches')} "
                   f"({counted(spool.expired_spans + told.spans, 'span')}) older than "
                   f"spool_max_age={age(settings.spool_max_age)}")
    print(f"sent {counted(tally.sent, 'batch', 'batches')} ({counted(tally.spans, 'span')}) to {shown}; "
          f"{tally.rejected} rejected (set aside in {spool.rejected}){unreadable}{expired}; "
          f"{seen.for_endpoint} left in {spool.directory}")
    if tally.first_reason:
        print(f"set aside, the first because {tally.first_reason}: the batches behind it went on; once the "
              f"cause is fixed, `traced-run flush --set-aside` sends them again")
    for line in piles(dropped):
        print(f"dropped {line}")
    for line in piles(seen.others):
        print(f"left {line}: `traced-run flush --endpoint URL` sends them to {shown}, "
              "`traced-run flush --drop-other-endpoints` removes them")


def _written_for(spool: Spool, endpoint: str, given: str) -> str | None:
    """The endpoint batches were written for that ``--endpoint`` names: as given, or
    as a tracking URI (``<given>/v1/traces``); None when the spool holds none."""
    others = spool.survey(endpoint).others
    url = without_userinfo(given.rstrip("/"))
    for candidate in (url, url + "/v1/traces"):
        if candidate in others:
            return candidate
    say(f"no spooled batches were written for {mask_url(given)}"
        + (f" (the spool has some for: {', '.join(mask_url(e) for e in sorted(others))})" if others else ""))
    return None
