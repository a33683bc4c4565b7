"""Which trace a callee's spans land in, decided from the remote parent's tracestate
(spans.context), on a real SDK tracer provider, in process."""

from __future__ import annotations

import re

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from traced_run.spans.context import TRACESTATE_KEY, Rerooted, digest

OURS = "http://mlflow.internal:5000/v1/traces\n\nname:shop"
CALLER_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0x00F067AA0BA902B7


def _served(state: TraceState) -> tuple[list[ReadableSpan], Rerooted]:
    """The spans MLflow gets of a request served under a caller's context with ``state``:
    a local root and one child."""
    exporter = InMemorySpanExporter()
    rerooted = Rerooted(SimpleSpanProcessor(exporter), OURS)
    provider = TracerProvider()
    provider.add_span_processor(rerooted)
    tracer = provider.get_tracer("test")
    caller = SpanContext(CALLER_TRACE, CALLER_SPAN, is_remote=True, trace_flags=TraceFlags(1),
                         trace_state=state)
    with (tracer.start_as_current_span("served", context=trace.set_span_in_context(NonRecordingSpan(caller))),
          tracer.start_as_current_span("inner")):
        pass
    return list(exporter.get_finished_spans()), rerooted


def test_a_caller_of_the_same_destination_is_joined_under_its_span() -> None:
    (inner, served), _ = _served(TraceState([(TRACESTATE_KEY, digest(CALLER_TRACE, OURS))]))
    assert served.context is not None and inner.context is not None and served.parent is not None
    assert served.context.trace_id == inner.context.trace_id == CALLER_TRACE
    assert served.parent.span_id == CALLER_SPAN
    assert served.links == ()


def test_any_other_caller_gets_a_trace_of_its_own_linked_to_it() -> None:
    for state in (TraceState(), TraceState([(TRACESTATE_KEY, digest(CALLER_TRACE, OURS + "x"))]),
                  TraceState([(TRACESTATE_KEY, digest(CALLER_TRACE + 1, OURS))])):
        (inner, served), _ = _served(state)
        assert served.context is not None and inner.context is not None and inner.parent is not None
        assert served.parent is None
        assert served.context.trace_id == inner.context.trace_id != CALLER_TRACE
        assert inner.parent.span_id == served.context.span_id
        assert inner.parent.trace_id == served.context.trace_id
        (link,) = served.links
        assert (link.context.trace_id, link.context.span_id) == (CALLER_TRACE, CALLER_SPAN)


def test_a_parent_marked_remote_in_a_trace_rooted_here_is_this_processs_own() -> None:
    """A context handed to another thread or task as if it came from outside (logfire's sqlite3
    spans in pydantic-ai's chat app have it so): the trace stays as it is."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(Rerooted(SimpleSpanProcessor(exporter), OURS))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("POST /chat/") as root:
        own = root.get_span_context()
        as_if_remote = SpanContext(own.trace_id, own.span_id, is_remote=True, trace_flags=own.trace_flags)
        with tracer.start_as_current_span("SELECT",
                                          context=trace.set_span_in_context(NonRecordingSpan(as_if_remote))):
            pass
    select, post = exporter.get_finished_spans()
    assert select.context is not None and post.context is not None and select.parent is not None
    assert select.context.trace_id == post.context.trace_id == own.trace_id
    assert select.parent.span_id == own.span_id and select.links == ()


def test_what_a_request_carries_joins_only_where_the_trace_is() -> None:
    _, rerooted = _served(TraceState())
    here = SpanContext(CALLER_TRACE + 7, CALLER_SPAN, is_remote=False,
                       trace_state=TraceState([("other", "1")]))
    sent = rerooted.outgoing(here)
    assert (sent.trace_id, sent.span_id) == (here.trace_id, here.span_id)
    assert sent.trace_state.get("other") == "1"
    assert rerooted.joins(SpanContext(here.trace_id, 1, is_remote=True, trace_state=sent.trace_state))
    # A trace moved to one of its own is elsewhere in MLflow: a callee must not join the caller's id.
    moved = rerooted.outgoing(SpanContext(CALLER_TRACE, CALLER_SPAN, is_remote=False,
                                          trace_state=TraceState([(TRACESTATE_KEY, "0" * 16)])))
    assert TRACESTATE_KEY not in moved.trace_state


def test_the_digest_names_nothing_and_differs_per_trace() -> None:
    values = {digest(trace_id, OURS) for trace_id in range(1, 1001)}
    assert len(values) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{16}", value) for value in values)
    assert digest(1, OURS) != digest(1, OURS.replace("shop", "shop2"))
