"""``traced-run flush``: send the spool now, from the command line.

Sends every spooled batch addressed to the configured endpoint, oldest first,
with the current credentials; stops at the first batch MLflow does not take
(it is then unreachable: the rest would fail the same way). Files in the spool
that are not readable batches are set aside, once, and counted.
"""

from __future__ import annotations

import contextlib

from traced_run.export import Sender
from traced_run.report import mask_url, say
from traced_run.settings import Settings
from traced_run.spool import Spool, SpoolRefused


def flush(settings: Settings) -> int:
    """Returns 0 when nothing is left for this endpoint, 1 otherwise."""
    spool = Spool.of(settings)
    endpoint = settings.traces_endpoint or ""
    sender = Sender(settings)
    sent = spans = rejected = 0
    problem = ""
    try:
        with contextlib.closing(spool.send(endpoint, lambda batch: sender.post(
                batch.payload, batch.target, settings.timeout))) as sending:
            for batch, outcome, aside in sending:
                if outcome.delivered:
                    sent += 1
                    spans += batch.spans
                elif aside is not None:
                    rejected += 1
                else:
                    problem = outcome.reason
        left = spool.survey(endpoint).for_endpoint
    except SpoolRefused as error:
        say(str(error))
        return 1
    except OSError as error:
        say(f"cannot use the spool {spool.directory}: {error.strerror}")
        return 1
    unreadable = (f"; {spool.unreadable} files that were no readable batch set aside too "
                  f"(first: {spool.unreadable_why})") if spool.unreadable else ""
    print(f"sent {sent} batches ({spans} spans) to {mask_url(endpoint)}; {rejected} rejected "
          f"(set aside in {spool.rejected}){unreadable}; {left} left in {spool.directory}")
    if problem:
        say(f"stopped: {mask_url(endpoint)} did not take a batch ({problem})")
    return 1 if left else 0
