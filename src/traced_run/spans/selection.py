"""Decides which traces go to MLflow: those that hold a pydantic-ai span, whole.

traced-run's processor sits on whichever tracer provider pydantic-ai's spans
go to, and that may be the app's own (logfire's, or one FastAPI's
instrumentation also uses), which carries every span of the app: health
checks, database calls, HTTP requests with no agent in them. A span that ends
before anything in its trace has been seen of pydantic-ai waits here; the
trace is wanted as soon as a pydantic-ai span starts in it, and its waiting
spans go on then; when the trace's local root (no parent, or a parent in
another process) ends with no agent seen, what waited is kept a while (a
bounded number, see ``durable.EndedTraces``) for an agent that starts in the
trace later, as a Temporal workflow's does, else dropped. So the decision does
not depend on when the app set up its provider, and an HTTP request span
around an agent run arrives as the trace's root.

When that root is the app's span, it gets what came in first and what went
out last as its inputs and outputs (MLflow shows the root's as the trace's
Request and Response): the first agent run's prompt and the last one's output,
of the runs the app started itself (not those a tool or another agent started),
unless the root has its own. Its name is the agent's when one run is all there
is, else the root's own (a graph's, a route's). A span's ``service.name`` is its
resource's when that names one; else (the SDK's made-up ``unknown_service``, or
traced-run's own provider) the one the app's global provider names, else
traced-run's default.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, TypeGuard

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanContext, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from traced_run import report
from traced_run.spans.durable import DbosRuns, EndedTraces, WorkflowSpans
from traced_run.spans.messages import last_prompt

PYDANTIC_AI_SCOPE = "pydantic-ai"
"""The instrumentation scope name pydantic-ai gives every tracer it asks for."""
TRACE_NAME_TAG = "mlflow.traceTag.mlflow.traceName"
MAX_WAITING = 4096
"""Spans of undecided traces held at once; past it the oldest are dropped."""
MAX_OPEN = 65536
"""Open spans tracked at once (an agent trace's open spans are ended if the process leaves mid-run)."""
MAX_DECIDED = 8192
"""Traces whose decision is remembered, for spans that end after their local root."""
LEFT_OPEN = "interrupted: the process ended before this span did"
"""Why a root a process left open (killed) ended, as a later process sends it (``open_root``)."""

_NO_AGENT = "no agent"
_LEFT_TO_MLFLOW = "MLflow's autolog records it"
_LEFT_TO_AUTOLOG = ("mlflow.pydantic_ai.autolog() is on in this app and records its agent runs in MLflow "
                    "itself: traced-run leaves those runs to it, so each is one trace (traced-run's spool, "
                    "redaction and content settings do not apply to them)")


class TraceSelection(SpanProcessor):
    """Passes on the spans of agent traces to ``inner``; holds the rest until their trace is decided."""

    def __init__(self, inner: SpanProcessor, *, service_name: str, max_waiting: int = MAX_WAITING,
                 own: Resource | None = None) -> None:
        """``service_name``: the default, for spans of ``own`` (traced-run's provider's resource)
        and of unnamed resources while the app's global provider names no service either."""
        self._inner = inner
        self._names = _ServiceNames(service_name, own)
        self._held = _Waiting(max_waiting)
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forked)
        self._decided: OrderedDict[int, ReadableSpan | str] = OrderedDict()
        """Trace id -> the trace's outermost pydantic-ai span, or why the trace does not go."""
        self._open = _OpenSpans()
        """What an interrupted run leaves open."""
        self._prompts: dict[int, AttributeValue] = {}
        """Wanted trace id -> the messages its latest model call was sent (the prompt of a run cut off)."""
        self._answers = _Answers()
        self._runs = _Runs()
        self._workflows = WorkflowSpans()
        self._ended = EndedTraces()
        self._dbos = DbosRuns()
        self._started_in_handler: dict[int, BaseException] = {}
        """Span id -> the cancellation or exit being handled when it started (not what cut it off)."""
        self._told_incomplete = False
        self._told_autolog = False

    def _forked(self) -> None:
        """In a forked child: a fork while an app thread held the lock would leave it held
        for ever; and the spans open in the parent are the parent's to end (a worker of a
        pool a tool started must not end its parent's run as interrupted)."""
        self._lock = threading.Lock()
        self._open = _OpenSpans()
        self._started_in_handler = {}

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._inner.on_start(span, parent_context)
        scope = span.instrumentation_scope
        if scope is None or scope.name != PYDANTIC_AI_SCOPE:
            with self._lock:
                self._track(span)
            return
        trace_id = span.context.trace_id
        handling = _cancellation()
        self._dbos.started(trace_id, span.attributes or {})
        with self._lock:
            self._track(span)
            self._runs.started(span, self._open.by_id)
            if handling is not None:
                self._started_in_handler[span.context.span_id] = handling
            decided = self._decided.get(trace_id, _NO_AGENT)
            if decided is not _NO_AGENT:  # wanted already, or left to MLflow's autolog
                return
            if _autolog_records_it():
                _remember(self._decided, trace_id, _LEFT_TO_MLFLOW)
                self._held.drop(trace_id)
                tell_autolog, self._told_autolog = not self._told_autolog, True
                waiting, evicted = deque[ReadableSpan](), 0
            else:
                tell_autolog = False
                _remember(self._decided, trace_id, span)
                waiting = self._held.drop(trace_id)
                waiting.extend(self._ended.revive(trace_id))
                evicted = self._held.evicted(trace_id)
        for earlier in waiting:
            self._inner.on_end(self._shaped(earlier, None))
        if evicted and not self._told_incomplete:
            self._told_incomplete = True
            report.say(_incomplete(evicted, self._held.max_waiting))
        if tell_autolog:
            report.say(_LEFT_TO_AUTOLOG)

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None:
            return
        trace_id = context.trace_id
        with self._lock:
            self._open.forget(context.span_id)
            handled = self._started_in_handler.pop(context.span_id, None)
            replayed, started = self._workflows.ended(context.span_id)
            # Temporal's interceptor marks a span's parent remote even in the process that made it.
            parent = span.parent
            local_root = parent is None or (parent.is_remote and parent.span_id not in self._open.by_id)
            agent = self._decided.get(trace_id)
            if replayed or self._undecided(trace_id, agent, span, local_root):
                return
            if started is not None:  # started in a replay: the workflow's time, as in the first attempt
                span = copy_span(span, dict(span.attributes or {}), start_time=started)
            if isinstance(agent, ReadableSpan):
                messages = (span.attributes or {}).get("gen_ai.input.messages")
                if messages is not None:
                    self._prompts[trace_id] = messages
                agent = self._runs.ended(span, agent, self._decided)
            # A Temporal activity's span, made while the workflow's run goes on, does not end the trace.
            trace_end = local_root and not (temporals(span) and self._runs.running(trace_id))
            late = self._ended.release(trace_id) if trace_end else []
            messages = self._prompts.pop(trace_id, None) if trace_end else None
            answer = self._answers.of(trace_id, span, trace_end) if isinstance(agent, ReadableSpan) else None
            last = self._runs.take(trace_id) if trace_end else None
        if isinstance(agent, str) or agent is None:
            return
        cut_off = _cut_off(span, handled)
        if cut_off is not None:
            span = copy_span(span, dict(span.attributes or {}), status=Status(StatusCode.ERROR, cut_off))
        output = _text(answer)
        if output is not None:
            span = copy_span(span, {**(span.attributes or {}), "output.value": output})
        late, span = _rooted(late, span)
        self._inner.on_end(self._shaped(span, agent if trace_end and _within(span, agent) else None,
                                        messages, last))
        for index, root in enumerate(late):
            self._inner.on_end(self._shaped(root, agent if index == 0 and root.parent is None else None,
                                            messages, last))

    def _undecided(self, trace_id: int, agent: ReadableSpan | str | None, span: ReadableSpan,
                   local_root: bool) -> bool:
        """Holds ``span`` of a trace with no agent yet, to wait or be kept (lock held); else False."""
        if agent is not None and agent is not _NO_AGENT:
            return False
        if agent is None and not local_root:
            self._held.hold(trace_id, span)
            return True
        self._ended.keep(trace_id, [*self._held.drop(trace_id), span])
        self._held.evicted(trace_id)
        _remember(self._decided, trace_id, _NO_AGENT)
        return True

    def agent_span_over(self, context: SpanContext) -> Span | None:
        """The innermost open pydantic-ai span at or above the open span ``context``, in a trace
        traced-run sends: the operation of an agent run that code running under it is part of."""
        with self._lock:
            wanted = isinstance(self._decided.get(context.trace_id), ReadableSpan)
            return _nearest_pydantic_ai(self._open.by_id, context.span_id) if wanted else None

    def _track(self, span: Span) -> None:
        """Remember an open span (lock held)."""
        forgotten = self._open.add(span)
        self._workflows.started(span.context.span_id)
        if forgotten is not None:
            self._started_in_handler.pop(forgotten, None)

    def interrupt(self, why: str) -> int:
        """End, in the copies MLflow gets, every span of an agent trace still open (the
        process is leaving mid-run), with an error status saying ``why``: the trace then
        arrives complete instead of in progress for ever. Returns how many were open."""
        now = time.time_ns()
        with self._lock:
            cut = [span for span in self._open.by_id.values()
                   if isinstance(self._decided.get(span.context.trace_id), ReadableSpan)
                   and not self._workflows.durable(span.context.span_id)]
            # The outermost pydantic-ai span (the agent run) has no messages before it ends.
            prompts = {span.context.span_id: self._prompts.get(span.context.trace_id) for span in cut
                       if self._decided.get(span.context.trace_id) is span}
            for span in cut:
                self._open.forget(span.context.span_id)
        # Children first, so each trace's root is the last of it to arrive, as in a finished run.
        for span in sorted(cut, key=lambda span: span.start_time or 0, reverse=True):
            self.on_end(_ended(span, now, f"interrupted: {why}", prompts.get(span.context.span_id)))
        return len(cut)

    def open_root(self, trace_id: int) -> ReadableSpan | None:
        """The open root (no parent) of agent trace ``trace_id`` as MLflow would get it had it
        ended now as ``LEFT_OPEN``; None when it has none open. Kept in case this process is
        killed (delivery's ``open_roots``); not one in a Temporal workflow, which goes on elsewhere."""
        with self._lock:
            agent = self._decided.get(trace_id)
            root = self._open.root(trace_id)
            if root is None or not isinstance(agent, ReadableSpan) or self._workflows.durable(
                    root.context.span_id):
                return None
            messages = self._prompts.get(trace_id)
        ended = _ended(root, time.time_ns(), LEFT_OPEN, messages if agent is root else None)
        return self._shaped(ended, None if agent is root else agent, messages)

    def _shaped(self, span: ReadableSpan, agent: ReadableSpan | None, messages: AttributeValue | None = None,
                last: tuple[ReadableSpan, int] | None = None) -> ReadableSpan:
        """``span`` as MLflow should get it: the agents' summary on an app's root span, a real
        service name, a DBOS run's session and tags (``durable.DbosRuns``). The span itself is
        the app's too, so changes go on a copy."""
        resource = self._names.of(span.resource)
        summary = _summary(span, agent, messages, last) if agent is not None and agent is not span else None
        durable = self._dbos.attributes(span)
        if resource is span.resource and not summary and not durable:
            return span
        attributes = dict(span.attributes or {})
        for key, value in (summary or {}).items():
            attributes.setdefault(key, value)
        return copy_span(span, {**attributes, **durable}, resource=resource)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _OpenSpans:
    """Spans started and not yet ended (under the selection's lock): by span id, and the roots
    (no parent) by trace id, which the delivery thread asks for per batch under that lock, the
    one the app's threads take: found without a scan of every open span."""

    def __init__(self) -> None:
        self.by_id: dict[int, Span] = {}
        self._roots: dict[int, list[Span]] = {}
        """One per trace, but for trace ids an id generator repeats (a workflow's replays)."""

    def add(self, span: Span) -> int | None:
        """Remember ``span``; spans never ended (a leak in the app) are forgotten oldest first
        past ``MAX_OPEN``: the span id forgotten, if one was."""
        self.by_id[span.context.span_id] = span
        if span.parent is None:
            self._roots.setdefault(span.context.trace_id, []).append(span)
        if len(self.by_id) <= MAX_OPEN:
            return None
        oldest = next(iter(self.by_id))
        self.forget(oldest)
        return oldest

    def forget(self, span_id: int) -> None:
        span = self.by_id.pop(span_id, None)
        if span is None or span.parent is not None:
            return
        roots = self._roots.get(span.context.trace_id, [])
        if span in roots:
            roots.remove(span)
        if not roots:
            self._roots.pop(span.context.trace_id, None)

    def root(self, trace_id: int) -> Span | None:
        """The trace's open root (the first to start, if there are several)."""
        roots = self._roots.get(trace_id)
        return roots[0] if roots else None


class _Waiting:
    """Spans of traces not decided yet (no agent so far, root not ended), bounded (lock held)."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._waiting: OrderedDict[int, deque[ReadableSpan]] = OrderedDict()
        self._spans = 0
        self._evicted: OrderedDict[int, int] = OrderedDict()
        """Undecided traces whose waiting spans the bound dropped, with how many."""

    def drop(self, trace_id: int) -> deque[ReadableSpan]:
        waiting = self._waiting.pop(trace_id, deque())
        self._spans -= len(waiting)
        return waiting

    def evicted(self, trace_id: int) -> int:
        """How many of the trace's spans the bound dropped; forgotten once asked."""
        return self._evicted.pop(trace_id, 0)

    def hold(self, trace_id: int, span: ReadableSpan) -> None:
        """Past the bound, the oldest waiting span is dropped: most such spans never see an
        agent (a long-lived websocket's messages, say)."""
        self._waiting.setdefault(trace_id, deque()).append(span)
        self._spans += 1
        if self._spans <= self.max_waiting:
            return
        oldest = next(iter(self._waiting))
        spans = self._waiting[oldest]
        spans.popleft()
        if not spans:
            del self._waiting[oldest]
        self._spans -= 1
        self._evicted[oldest] = self._evicted.get(oldest, 0) + 1
        self._evicted.move_to_end(oldest)
        while len(self._evicted) > MAX_DECIDED:
            self._evicted.popitem(last=False)


class _ServiceNames:
    """Each resource as MLflow gets it: its own ``service.name`` when it names one, else
    the app's global provider's, else traced-run's default (``service_name``)."""

    def __init__(self, service_name: str, own: Resource | None) -> None:
        self._service_name = service_name
        self._own = own
        self._resources: dict[int, tuple[Resource, Resource]] = {}

    def of(self, resource: Resource) -> Resource:
        service = resource.attributes.get("service.name")
        if resource is not self._own and _names_one(service):
            return resource
        # Asked per span: the app may set its global provider, named, after agents ran.
        name = _apps_service_name() or self._service_name
        cached = self._resources.get(id(resource))
        if cached is not None and cached[0] is resource and cached[1].attributes.get("service.name") == name:
            return cached[1]
        named = resource if service == name else resource.merge(Resource({"service.name": name}))
        self._resources[id(resource)] = (resource, named)
        return named


class _Answers:
    """Each wanted trace's latest model answer (under the selection's lock), kept unparsed:
    this is the app's thread."""

    def __init__(self) -> None:
        self._latest: dict[int, AttributeValue] = {}

    def of(self, trace_id: int, span: ReadableSpan, local_root: bool) -> AttributeValue | None:
        """The answer of the trace's latest model call, if ``span`` is an agent run that ended
        with no result (a ``break`` out of its stream or ``iter`` loop): the output it had,
        which MLflow then shows as its outputs."""
        attributes = span.attributes or {}
        answer = attributes.get("gen_ai.output.messages")
        if answer is not None:
            self._latest[trace_id] = answer
        run_without_result = "pydantic_ai.all_messages" in attributes and "final_result" not in attributes
        answer = self._latest.get(trace_id) if run_without_result else None
        if local_root:
            self._latest.pop(trace_id, None)
        return answer


class _Runs:
    """Per trace, the runs the app started itself (outermost pydantic-ai spans: not those a
    tool or another agent started): the latest to end, whose output went out last, and how
    many have ended. Used with the selection's lock held."""

    def __init__(self) -> None:
        self._open: dict[int, set[int]] = {}
        """Trace id -> the span ids of its outermost pydantic-ai spans not ended yet."""
        self._last: dict[int, tuple[ReadableSpan, int]] = {}

    def started(self, span: Span, open_spans: dict[int, Span]) -> None:
        """Told at the start of a pydantic-ai span, when all above it are still open (an
        interrupted run's spans leave ``open_spans`` before they end)."""
        parent = span.parent
        if parent is not None and _nearest_pydantic_ai(open_spans, parent.span_id) is not None:
            return
        self._open.setdefault(span.context.trace_id, set()).add(span.context.span_id)

    def ended(self, span: ReadableSpan, first: ReadableSpan,
              decided: dict[int, ReadableSpan | str]) -> ReadableSpan:
        """Told at the end of a pydantic-ai span of a wanted trace whose ``first`` run is known;
        returns the first run as it is now: ``span`` when that is it, ended (a Temporal workflow
        replays a run in a new span object of the same id, which alone ends)."""
        context = span.context
        if context is None or context.span_id not in self._open.get(context.trace_id, ()):
            return first
        self._open[context.trace_id].discard(context.span_id)
        self._last[context.trace_id] = (span, self._last.get(context.trace_id, (span, 0))[1] + 1)
        if first.context is None or first.context.span_id != context.span_id:
            return first
        decided[context.trace_id] = span
        return span

    def running(self, trace_id: int) -> bool:
        return bool(self._open.get(trace_id))

    def take(self, trace_id: int) -> tuple[ReadableSpan, int] | None:
        """The trace's last run and the count, all of it forgotten (its local root has ended)."""
        self._open.pop(trace_id, None)
        return self._last.pop(trace_id, None)


def _remember(decided: OrderedDict[int, ReadableSpan | str], trace_id: int,
              agent: ReadableSpan | str) -> None:
    decided[trace_id] = agent
    decided.move_to_end(trace_id)
    while len(decided) > MAX_DECIDED:
        decided.popitem(last=False)


def _incomplete(dropped: int, max_waiting: int) -> str:
    return (f"an agent ran in a trace after {dropped} of its earlier spans were dropped (more than "
            f"{max_waiting} spans of traces with no agent yet were waiting): it reaches MLflow without them")


def _rooted(roots: list[ReadableSpan], run: ReadableSpan) -> tuple[list[ReadableSpan], ReadableSpan]:
    """Roots held for a trace's late agent, outermost first, and the ``run`` whose end released
    them. When the outermost is a span of Temporal's whose parent is in another process (the
    workflow's client, which runs no agent and so sends nothing), the trace gets a root here:
    MLflow gives a trace its state only from a span with no parent. The outermost held span is
    it when the run hangs from a held span; else the run is (a replayed run hangs from the
    client's span: Temporal makes its workflow span only the first time). Another caller's
    spans may reach MLflow: an app's span keeps its remote parent."""
    roots = sorted(roots, key=lambda root: (root.parent is not None, root.start_time or 0))
    if not roots or roots[0].parent is None or not temporals(roots[0]):
        return roots, run
    if run.parent is not None and run.parent.span_id in {root.context.span_id for root in roots}:
        roots[0] = copy_span(roots[0], dict(roots[0].attributes or {}), parent=None)
    else:
        run = copy_span(run, dict(run.attributes or {}), parent=None)
    return roots, run


def temporals(span: ReadableSpan) -> bool:
    """A span of Temporal's tracing interceptor (``temporalio.contrib.opentelemetry``, or the
    tracer pydantic-ai's ``LogfirePlugin`` gives it)."""
    scope = span.instrumentation_scope
    return scope is not None and scope.name.startswith("temporalio")


def _within(root: ReadableSpan, run: ReadableSpan) -> bool:
    """``run`` started inside ``root``'s time (not so a Temporal span made after the run)."""
    return (root.start_time or 0) <= (run.start_time or 0)


def _nearest_pydantic_ai(open_spans: dict[int, Span], span_id: int) -> Span | None:
    """The first pydantic-ai span from the open span ``span_id`` up its open ancestors."""
    span = open_spans.get(span_id)
    while span is not None:
        if _pydantic_ai(span):
            return span
        parent = span.parent
        span = open_spans.get(parent.span_id) if parent is not None else None
    return None


def _names_one(service: object) -> TypeGuard[str]:
    """``service.name`` says something someone chose, not the SDK's ``unknown_service...``."""
    return isinstance(service, str) and bool(service) and not service.startswith("unknown_service")


def _apps_service_name() -> str | None:
    """The service the app's global tracer provider names (logfire's wraps an SDK one), if any."""
    provider = trace.get_tracer_provider()
    resource = getattr(getattr(provider, "provider", provider), "resource", None)
    service = resource.attributes.get("service.name") if isinstance(resource, Resource) else None
    return service if _names_one(service) else None


def _ended(span: Span, now: int, why: str, messages: AttributeValue | None) -> ReadableSpan:
    """A copy of the open ``span`` as if it had ended now with an error; an agent run
    cut off (it has no messages of its own yet) gets the prompt of its last model call."""
    attributes = dict(span.attributes or {})
    if messages is not None and "pydantic_ai.all_messages" not in attributes:
        prompt = last_prompt(messages)
        if prompt is not None:
            attributes["input.value"] = prompt
    return copy_span(span, attributes, status=Status(StatusCode.ERROR, why), end_time=now)


def _cancellation() -> BaseException | None:
    """The cancellation or exit (``asyncio.CancelledError``, ``KeyboardInterrupt``,
    ``SystemExit``) passing or being handled on this thread now, if any."""
    passing = sys.exc_info()[1]
    return None if passing is None or isinstance(passing, (Exception, GeneratorExit)) else passing


def _cut_off(span: ReadableSpan, handled: BaseException | None) -> str | None:
    """Why a pydantic-ai span that ends while a cancellation or an exit passes through it
    (a server cancelling its request, Ctrl-C, ``sys.exit``) was cut off: pydantic-ai
    records only an ``Exception`` on its spans, and one left unset would show as OK.
    ``handled``: what was being handled when the span started (a run made in an
    ``except`` block, which that exception did not cut off)."""
    scope = span.instrumentation_scope
    if span.status.status_code is not StatusCode.UNSET or scope is None or scope.name != PYDANTIC_AI_SCOPE:
        return None
    passing = _cancellation()
    if passing is None or passing is handled or _left_by_the_app(passing):
        return None
    return f"interrupted: {type(passing).__name__}"


def _left_by_the_app(passing: BaseException) -> bool:
    """``passing`` is pydantic-ai ending a run the app left normally (a ``break`` out of a
    stream or an ``iter`` loop, an early ``return``), not a cancellation from outside.

    pydantic-ai (2.x) runs a run's span in a task of its own, awaiting the run's
    ``wrap_run`` capability chain; when the app leaves the run's context with no result, pydantic-ai
    cancels that task, so a ``CancelledError`` passes through the span though nothing
    failed. A cancellation from outside (``task.cancel()``, a timeout, a server cancelling
    its request) reaches that task as the error pydantic-ai re-raises there, which leaves it
    not cancelling, or while the app's task is cancelling too. Checked on pydantic-ai 2.68
    and 2.78; 1.x ran the span in the app's task and raised nothing on a normal leave.
    Python 3.10 has no ``Task.cancelling()``: there such a run stays as interrupted."""
    if not isinstance(passing, asyncio.CancelledError):
        return False
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop on this thread
        return False
    if task is None or not _cancelling(task):
        return False
    if not _runs_wrap_run(task.get_coro()):
        return False
    return not any(other is not task and _cancelling(other) for other in asyncio.all_tasks(task.get_loop()))


def _runs_wrap_run(coroutine: object) -> bool:
    """The task made for a run's ``wrap_run`` chain: its coroutine (pydantic-ai's task
    wrapper) awaits a ``wrap_run`` directly."""
    for _ in range(2):
        code = getattr(coroutine, "cr_code", None)
        if code is not None and code.co_name == "wrap_run":
            return True
        coroutine = getattr(coroutine, "cr_await", None)
    return False


def _cancelling(task: asyncio.Task[Any]) -> int:
    count: Callable[[], int] | None = getattr(task, "cancelling", None)  # Python >= 3.11
    return count() if count is not None else 0


def _text(answer: AttributeValue | None) -> str | None:
    """The text parts of a model call's answer (``gen_ai.output.messages``), if it has any."""
    try:
        parsed: Any = json.loads(answer) if isinstance(answer, str) else None
    except ValueError:
        return None
    parts = [part for message in (parsed if isinstance(parsed, list) else []) if isinstance(message, dict)
             for part in message.get("parts") or () if isinstance(part, dict) and part.get("type") == "text"]
    text = "".join(part["content"] for part in parts if isinstance(part.get("content"), str))
    return text or None


def copy_span(span: ReadableSpan, attributes: dict[str, AttributeValue], **changed: Any) -> ReadableSpan:
    """A copy of ``span`` with ``attributes`` and the ``changed`` fields: the span itself is the
    app's too (its other exporters), so what MLflow gets is always a copy."""
    fields: dict[str, Any] = dict(
        name=span.name, context=span.context, parent=span.parent, resource=span.resource,
        attributes=attributes, events=span.events, links=span.links, kind=span.kind, status=span.status,
        start_time=span.start_time, end_time=span.end_time, instrumentation_scope=span.instrumentation_scope,
    )
    fields.update(changed)
    return ReadableSpan(**fields)


def _autolog_records_it() -> bool:
    """MLflow's own pydantic-ai autolog has a span open around this run (its
    spans carry ``mlflow.message.format``); it sends the run to MLflow itself."""
    mlflow = sys.modules.get("mlflow")
    current = getattr(mlflow, "get_current_active_span", None)
    if current is None:
        return False
    try:
        span = current()
        return span is not None and span.get_attribute("mlflow.message.format") == "pydantic_ai"
    except Exception:  # an MLflow we do not know: not a reason to lose the run
        return False


def _pydantic_ai(span: ReadableSpan) -> bool:
    scope = span.instrumentation_scope
    return scope is not None and scope.name == PYDANTIC_AI_SCOPE


def _summary(root: ReadableSpan, first: ReadableSpan, messages: AttributeValue | None,
             last: tuple[ReadableSpan, int] | None) -> dict[str, AttributeValue]:
    """For a root span that is the app's own: the first run's prompt (the prompt of the
    trace's last model call, ``messages``, when that run was cut off), the output of the
    ``last`` run to end, and the name: the agent's when that run is the first and only one,
    else the root's."""
    if _pydantic_ai(root):
        return {}
    attributes = first.attributes or {}
    summary: dict[str, AttributeValue] = {}
    prompt = last_prompt(attributes.get("pydantic_ai.all_messages", messages))
    if prompt is not None:
        summary["input.value"] = prompt
    final, runs = last or (first, 1)
    output = (final.attributes or {}).get("final_result")
    if isinstance(output, str):
        summary["output.value"] = output
    # MLflow names a trace only from the tag, never after its root span.
    name = attributes.get("gen_ai.agent.name") if runs == 1 else root.name
    if isinstance(name, str) and name:
        summary[TRACE_NAME_TAG] = name
    return summary
