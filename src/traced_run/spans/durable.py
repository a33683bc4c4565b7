"""Durable execution: spans of agent runs inside Temporal workflows, and traces whose
root ended before their agent started.

Temporal runs a workflow's code again from its start whenever a worker has dropped the
workflow from its cache (a restart, a full cache, ``max_cached_workflows=0``): each
replay starts the agent run again, and the attempt a worker evicts is cancelled. Like
Temporal's own replay-safe tracer provider (which pydantic-ai's ``LogfirePlugin``
installs), spans made in a workflow take their ids from a deterministic random of the
workflow run, so a replay gives a span the ids it had; a span that ends while the workflow
replays its history (Temporal counts an eviction as replay) is not sent, since it
was sent when it first ended, or will be by the attempt that gets further. A span
started in a replay keeps the workflow's time, not the replay's.

temporalio is never imported here: workflow code runs in Temporal's import sandbox.
What Temporal has loaded is read from ``sys.modules``.
"""

from __future__ import annotations

import sys
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

_RANDOM = "__traced_run_id_random"
"""Where the workflow's random for span ids is kept, on the workflow instance."""
MAX_TRACKED = 65536
"""Spans started in workflows tracked at once (those never ended are forgotten oldest first)."""
MAX_ENDED = 1024
"""Spans of traces that ended with no agent, kept for an agent that starts in them later."""


def _workflow() -> Any:
    """Temporal's workflow module when the current code runs in a workflow, else None."""
    workflow = sys.modules.get("temporalio.workflow")
    if workflow is None or not workflow.in_workflow():
        return None
    return workflow


def replaying() -> bool:
    """In a Temporal workflow replaying its history or being evicted."""
    workflow = _workflow()
    if workflow is None:
        return False
    unsafe = workflow.unsafe
    return bool(getattr(unsafe, "is_replaying_history_events", unsafe.is_replaying)())


class WorkflowIds(IdGenerator):
    """Random ids, but in a Temporal workflow the workflow's deterministic random: a replay
    gives its spans the ids they had, so MLflow gets one trace per workflow run."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()

    def generate_span_id(self) -> int:
        source = self._workflow_random()
        return self._random.generate_span_id() if source is None else source.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        source = self._workflow_random()
        return self._random.generate_trace_id() if source is None else source.getrandbits(128) or 1

    @staticmethod
    def _workflow_random() -> Any:
        """A random of traced-run's own per workflow run: Temporal's interceptor draws its span
        ids from the workflow's only when not replaying, so ids from that sequence shift between
        a workflow's first run and its replays, and two spans get one id."""
        workflow = _workflow()
        if workflow is None or workflow.unsafe.is_read_only():
            return None
        instance = workflow.instance()
        source = getattr(instance, _RANDOM, None)
        if source is None:
            try:
                source = workflow.new_random("traced-run")
            except TypeError:  # a temporalio whose randoms have no names: ids as outside workflows
                return None
            setattr(instance, _RANDOM, source)
        return source


class WorkflowSpans:
    """The spans started in a Temporal workflow and not ended yet (under the selection's lock):
    the workflow goes on in another worker if this process leaves, so they are never ended
    as interrupted here."""

    def __init__(self) -> None:
        self._started: OrderedDict[int, int | None] = OrderedDict()
        """Span id -> the workflow's time when the span started in a replay, else None."""

    def started(self, span_id: int) -> None:
        workflow = _workflow()
        if workflow is None:
            return
        self._started[span_id] = workflow.time_ns() if replaying() else None
        if len(self._started) > MAX_TRACKED:
            self._started.popitem(last=False)

    def ended(self, span_id: int) -> tuple[bool, int | None]:
        """Whether the span's end is a replay's (not to be sent), and the start time it should have."""
        return replaying(), self._started.pop(span_id, None)

    def durable(self, span_id: int) -> bool:
        return span_id in self._started


class EndedTraces:
    """Traces whose local root ended with no agent seen, kept (a bounded number of spans) for an
    agent that starts in them afterwards: a Temporal client's ``StartWorkflow`` span and the
    workflow's ``RunWorkflow`` span end before the workflow's agent starts. Their roots are held
    until the trace's agent runs have ended, then sent with the runs' summary."""

    def __init__(self, max_spans: int = MAX_ENDED) -> None:
        self._max_spans = max_spans
        self._ended: OrderedDict[int, deque[ReadableSpan]] = OrderedDict()
        self._spans = 0
        self._held: dict[int, list[ReadableSpan]] = {}

    def keep(self, trace_id: int, spans: Iterable[ReadableSpan]) -> None:
        kept = self._ended.setdefault(trace_id, deque())
        for span in spans:
            kept.append(span)
            self._spans += 1
        while self._spans > self._max_spans:
            _, oldest = self._ended.popitem(last=False)
            self._spans -= len(oldest)

    def revive(self, trace_id: int) -> list[ReadableSpan]:
        """An agent started in ``trace_id``: its kept spans to send now; its roots are held."""
        kept = self._ended.pop(trace_id, deque())
        self._spans -= len(kept)
        roots = [span for span in kept if span.parent is None or span.parent.is_remote]
        if roots:
            self._held[trace_id] = roots
            while len(self._held) > self._max_spans:  # runs that never end (a leak in the app)
                del self._held[next(iter(self._held))]
        return [span for span in kept if not (span.parent is None or span.parent.is_remote)]

    def release(self, trace_id: int) -> list[ReadableSpan]:
        """The held roots of ``trace_id``, whose agent runs have all ended, outermost first."""
        return self._held.pop(trace_id, [])
