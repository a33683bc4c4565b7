"""Durable execution: spans of agent runs inside Temporal workflows, traces whose
root ended before their agent started, and agent runs in DBOS workflows.

Temporal runs a workflow's code again from its start whenever a worker has dropped the
workflow from its cache (a restart, a full cache, ``max_cached_workflows=0``): each
replay starts the agent run again, and the attempt a worker evicts is cancelled. Like
Temporal's own replay-safe tracer provider (which pydantic-ai's ``LogfirePlugin``
installs), spans made in a workflow take their ids from a deterministic random of the
workflow run, so a replay gives a span the ids it had; a span that ends while the workflow
replays its history (Temporal counts an eviction as replay) is not sent, since it
was sent when it first ended, or will be by the attempt that gets further. A span
started in a replay keeps the workflow's time, not the replay's.

DBOS recovers a workflow a process left (killed, crashed) by running it again from its start
in another, its recorded steps' results read back. The agent run it starts again is a trace of
its own: MLflow gets it tagged ``traced_run.recovered`` (and every DBOS run's trace
``dbos.workflow_id``). A run whose agent draws its conversation id at random (``DBOSAgent``, or
a plain agent, in a workflow: ``DBOSDurability`` derives it from the workflow) gets the workflow
id as its conversation id, so the run a process left and its recovery share MLflow's session.

temporalio and dbos are never imported here: workflow code runs in Temporal's import sandbox,
and an app that does not use one must not load it. What is loaded is read from ``sys.modules``.
"""

from __future__ import annotations

import sys
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.util.types import AttributeValue

_RANDOM = "__traced_run_id_random"
"""Where the workflow's random for span ids is kept, on the workflow instance."""
MAX_TRACKED = 65536
"""Spans started in workflows tracked at once (those never ended are forgotten oldest first)."""
MAX_ENDED = 1024
"""Spans of traces that ended with no agent, kept for an agent that starts in them later."""
MAX_DBOS_RUNS = 8192
"""Traces of agent runs in DBOS workflows remembered, for their spans still to end."""
RECOVERED_TAG = "mlflow.traceTag.traced_run.recovered"
WORKFLOW_TAG = "mlflow.traceTag.dbos.workflow_id"


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


class DbosRuns:
    """Agent traces started in a DBOS workflow: what MLflow's copies of their spans get."""

    def __init__(self) -> None:
        self._runs: OrderedDict[int, tuple[str, bool, bool]] = OrderedDict()
        """Trace id -> the workflow id, whether the run recovers one, whether its conversation
        id is random (replaced by the workflow id)."""

    def started(self, trace_id: int, attributes: Any) -> None:
        """An agent run started, in the app's thread (``attributes``: its span's): once per
        trace, a DBOS workflow's status is read (one query of DBOS's system database, which
        has just written a checkpoint for the workflow's step)."""
        if (trace_id in self._runs or "dbos" not in sys.modules
                or attributes.get("gen_ai.operation.name") != "invoke_agent"):
            return
        found = _dbos_workflow()
        if found is None:
            return
        workflow_id, recovered = found
        run_id = str(attributes.get("gen_ai.agent.call.id", ""))
        random_conversation = not run_id.startswith(f"{workflow_id}:") and _uuid7(
            attributes.get("gen_ai.conversation.id"))
        self._runs[trace_id] = (workflow_id, recovered, random_conversation)
        while len(self._runs) > MAX_DBOS_RUNS:
            self._runs.popitem(last=False)

    def attributes(self, span: ReadableSpan) -> dict[str, AttributeValue]:
        """What the copy of ``span`` MLflow gets adds: the session, and on the root the tags."""
        run = self._runs.get(span.context.trace_id) if span.context else None
        if run is None:
            return {}
        workflow_id, recovered, random_conversation = run
        added: dict[str, AttributeValue] = {}
        if random_conversation:
            added["gen_ai.conversation.id"] = workflow_id
        if span.parent is None:
            added[WORKFLOW_TAG] = workflow_id
            if recovered:
                added[RECOVERED_TAG] = "true"
        return added


def _dbos_workflow() -> tuple[str, bool] | None:
    """The DBOS workflow this code runs in, and whether this execution recovers one: DBOS counts
    each start of a workflow's execution in its status's ``recovery_attempts`` (the first start
    is 1, each recovery one more). None outside a workflow. Read from DBOS's system database
    directly: ``DBOS.get_workflow_status`` in a workflow is a step, recorded (a recovery would
    read back the first execution's status) and changing the workflow's step sequence."""
    dbos = sys.modules["dbos"]
    try:
        workflow_id = dbos.DBOS.workflow_id
        if not isinstance(workflow_id, str) or not workflow_id:
            return None
    except Exception:  # a DBOS we do not know: the run is traced as any other
        return None
    try:
        status = dbos._dbos._get_dbos_instance()._sys_db.get_workflow_status(workflow_id)
        attempts = status.get("recovery_attempts") if status else None
    except Exception:
        attempts = None
    return workflow_id, isinstance(attempts, int) and attempts > 1


def _uuid7(value: object) -> bool:
    """A UUID of version 7: what pydantic-ai draws for a run given no conversation id."""
    try:
        return isinstance(value, str) and uuid.UUID(value).version == 7
    except ValueError:
        return False
