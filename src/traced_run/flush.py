"""``traced-run flush``: send the spool now, from the command line.

Sends every spooled batch addressed to the configured endpoint, oldest first,
with the current credentials; stops at the first batch MLflow does not take
(it is then unreachable: the rest would fail the same way).
"""

from __future__ import annotations

from traced_run.export import Sender
from traced_run.report import mask_url, say
from traced_run.settings import Settings
from traced_run.spool import Spool


def flush(settings: Settings) -> int:
    """Returns 0 when nothing is left for this endpoint, 1 otherwise."""
    spool = Spool.of(settings)
    endpoint = settings.traces_endpoint or ""
    sender = Sender(settings)
    sent = spans = rejected = 0
    problem = ""
    for batch in spool.claim(endpoint):
        outcome = sender.post(batch.payload, batch.target, settings.timeout)
        if outcome.delivered:
            spool.done(batch)
            sent += 1
            spans += batch.spans
        elif outcome.invalid:
            spool.reject(batch, outcome.reason)
            rejected += 1
        else:
            spool.release(batch)
            problem = outcome.reason
            break
    left = sum(1 for _ in spool.pending(endpoint))
    print(f"sent {sent} batches ({spans} spans) to {mask_url(endpoint)}; {rejected} rejected "
          f"(set aside in {spool.rejected}); {left} left in {spool.directory}")
    if problem:
        say(f"stopped: {mask_url(endpoint)} did not take a batch ({problem})")
    return 1 if left else 0
