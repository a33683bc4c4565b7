"""Trace context across processes: which trace a callee's spans land in, and what a request carries.

A request an agent run makes carries its trace (W3C ``traceparent``) and a ``tracestate`` entry
``traced-run=<digest>``: a keyed hash of the trace id under this process's destination (traces
endpoint, workspace, experiment). A callee under traced-run that computes the same digest for that
trace id writes to the same MLflow experiment, so its spans join the caller's trace under the
caller's span: MLflow stores spans of one trace id sent by two processes as one trace.

Any other remote parent (a caller traced elsewhere, or not at all: ``curl`` with a ``traceparent``
of its own) never reaches this MLflow, and a trace whose root never arrives stays IN_PROGRESS. So
the spans of such a trace go, in the copies MLflow gets, to a trace id of their own, the callee's
local root becoming its root with a span link to the remote parent. The same trace id would not
do: MLflow's trace ids are global to a server, and the caller's trace may be in another of its
experiments. The app's own exporters see every span as it is.

These headers also reach third parties (any API a tool calls). The digest changes with every trace
id and names nothing: who holds it can neither read the destination from it nor tell two traces of
one destination apart; only someone who guesses the endpoint, workspace and experiment exactly can
check that guess against it.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import threading
from collections import OrderedDict

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import Link, SpanContext

from traced_run.spans.selection import copy_span, temporals

TRACESTATE_KEY = "traced-run"
MAX_MOVED = 8192
"""Traces moved to a trace id of their own that are remembered, for their spans still to end."""
MAX_HERE = 65536
"""Span ids started in this process that are remembered, for the children still to start."""


def digest(trace_id: int, destination: str) -> str:
    """The ``tracestate`` value that says "this trace goes to ``destination``" for ``trace_id``."""
    mac = hmac.new(destination.encode(), trace_id.to_bytes(16, "big"), hashlib.sha256)
    return mac.hexdigest()[:16]


class Rerooted(SpanProcessor):
    """Passes spans on to ``inner``; those of a trace whose local root has a remote parent of
    another destination go to a trace of their own (see the module's docstring)."""

    def __init__(self, inner: SpanProcessor, destination: str) -> None:
        self._inner = inner
        self._destination = destination
        self._lock = threading.Lock()
        self._moved: OrderedDict[int, int] = OrderedDict()
        """The caller's trace id -> the trace id MLflow gets instead."""
        self._here: OrderedDict[int, None] = OrderedDict()
        """Span ids started in this process: a parent marked remote that is one of them is this
        process's own (a context carried across threads or tasks as if from outside, as logfire's
        sqlite3 spans in pydantic-ai's chat app have it, and Temporal's interceptor does)."""

    def joins(self, parent: SpanContext) -> bool:
        """A remote ``parent`` whose trace goes to this process's MLflow experiment."""
        return parent.trace_state.get(TRACESTATE_KEY) == digest(parent.trace_id, self._destination)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        parent = span.parent
        with self._lock:
            self._here[span.context.span_id] = None
            while len(self._here) > MAX_HERE:
                self._here.popitem(last=False)
        if parent is not None and self._from_a_caller(span) and not self.joins(parent):
            with self._lock:
                if parent.trace_id not in self._moved:
                    self._moved[parent.trace_id] = random.getrandbits(128) or 1
                    while len(self._moved) > MAX_MOVED:
                        self._moved.popitem(last=False)
        self._inner.on_start(span, parent_context)

    def _from_a_caller(self, span: ReadableSpan) -> bool:
        """``span``'s parent is a span of another process. Not so for Temporal's spans: their
        client's span (in the process that started the workflow) is left to spans.selection,
        which roots the trace at the worker's run (spans/durable.py)."""
        parent = span.parent
        if parent is None or not parent.is_remote or parent.span_id in self._here:
            return False
        return not temporals(span)

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        moved = None if context is None else self._moved.get(context.trace_id)
        if moved is not None:
            span = _moved(span, moved, span.parent is None or self._from_a_caller(span))
        self._inner.on_end(span)

    def outgoing(self, context: SpanContext) -> SpanContext:
        """``context`` as a request made under it carries it: with this destination's entry; in a
        moved trace without one (the callee cannot join a trace that is elsewhere in MLflow)."""
        state = context.trace_state
        if context.trace_id in self._moved:
            state = state.delete(TRACESTATE_KEY) if TRACESTATE_KEY in state else state
        elif TRACESTATE_KEY in state:
            state = state.update(TRACESTATE_KEY, digest(context.trace_id, self._destination))
        else:
            state = state.add(TRACESTATE_KEY, digest(context.trace_id, self._destination))
        return SpanContext(context.trace_id, context.span_id, is_remote=False,
                           trace_flags=context.trace_flags, trace_state=state)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _moved(span: ReadableSpan, trace_id: int, root: bool) -> ReadableSpan:
    """A copy of ``span`` in the trace ``trace_id``; a ``root`` (the local root) without its
    remote parent, linked to it instead."""
    own = span.context
    assert own is not None
    context = SpanContext(trace_id, own.span_id, is_remote=False, trace_flags=own.trace_flags,
                          trace_state=own.trace_state)
    parent = span.parent
    attributes = dict(span.attributes or {})
    if parent is None or root:
        links = (*span.links, Link(parent)) if parent is not None else span.links
        return copy_span(span, attributes, context=context, parent=None, links=links)
    parent = SpanContext(trace_id, parent.span_id, is_remote=False, trace_flags=parent.trace_flags)
    return copy_span(span, attributes, context=context, parent=parent)
