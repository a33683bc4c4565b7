"""In-process: a trace whose root ends before its agent starts (a Temporal client's
``StartWorkflow`` span, the workflow's ``RunWorkflow`` span under it) reaches the exporter
whole, its root after the agent run with the run's prompt, output and name."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import context, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from traced_run.spans.durable import EndedTraces
from traced_run.spans.selection import PYDANTIC_AI_SCOPE, TRACE_NAME_TAG, TraceSelection

MESSAGES = '[{"role":"user","parts":[{"type":"text","content":"Weather?"}]}]'


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    passed = InMemorySpanExporter()
    made = TracerProvider()
    made.add_span_processor(TraceSelection(SimpleSpanProcessor(passed), service_name="svc"))
    yield made, passed
    made.shutdown()


def _as_remote(span: trace.Span) -> context.Context:
    """The context a Temporal header carries: the span's ids, marked remote."""
    ids = span.get_span_context()
    return trace.set_span_in_context(NonRecordingSpan(SpanContext(ids.trace_id, ids.span_id, is_remote=True,
                                                                     trace_flags=ids.trace_flags)))


def _agent_run(provider: TracerProvider, parent: context.Context) -> None:
    with provider.get_tracer(PYDANTIC_AI_SCOPE).start_as_current_span("invoke_agent support",
                                                                      context=parent) as run:
        run.set_attribute("gen_ai.agent.name", "support")
        run.set_attribute("pydantic_ai.all_messages", MESSAGES)
        run.set_attribute("final_result", "Sunny.")


def _client_span(provider: TracerProvider) -> trace.Span:
    """A Temporal client's span, ended as it is before its workflow runs."""
    with provider.get_tracer("temporalio").start_as_current_span("StartWorkflow:Support") as client:
        return client


def _by_name(passed: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in passed.get_finished_spans()}


def test_roots_that_ended_before_the_agent_go_after_it_with_its_summary(
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    made, passed = provider
    client = _client_span(made)
    with made.get_tracer("temporalio").start_as_current_span("RunWorkflow:Support",
                                                             context=_as_remote(client)) as workflow:
        pass
    assert passed.get_finished_spans() == ()
    _agent_run(made, _as_remote(workflow))
    names = [span.name for span in passed.get_finished_spans()]
    assert names == ["invoke_agent support", "StartWorkflow:Support", "RunWorkflow:Support"]
    root = _by_name(passed)["StartWorkflow:Support"]
    assert root.parent is None
    assert root.attributes is not None
    assert root.attributes["input.value"] == "Weather?"
    assert root.attributes["output.value"] == "Sunny."
    assert root.attributes[TRACE_NAME_TAG] == "support"
    assert "input.value" not in (_by_name(passed)["RunWorkflow:Support"].attributes or {}), "the root's alone"


def test_a_workflow_span_whose_client_is_another_process_becomes_the_root(
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    made, passed = provider
    client = SpanContext(0x1234, 0x99, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    remote = trace.set_span_in_context(NonRecordingSpan(client))
    temporal = made.get_tracer("temporalio")
    with temporal.start_as_current_span("RunWorkflow:Support", context=remote) as workflow:
        pass
    _agent_run(made, _as_remote(workflow))
    root = _by_name(passed)["RunWorkflow:Support"]
    assert root.parent is None, "MLflow gives a trace a state only from a span with no parent"
    assert root.attributes is not None and root.attributes["input.value"] == "Weather?"
    assert _by_name(passed)["invoke_agent support"].parent is not None


def test_a_replayed_run_under_its_remote_client_becomes_the_root(
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    made, passed = provider
    client = SpanContext(0x1234, 0x99, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    remote = trace.set_span_in_context(NonRecordingSpan(client))
    with made.get_tracer("temporalio").start_as_current_span("RunWorkflow:Support", context=remote):
        pass
    _agent_run(made, remote)  # Temporal makes no workflow span in a replay: the run hangs from the client's
    assert _by_name(passed)["invoke_agent support"].parent is None
    assert _by_name(passed)["RunWorkflow:Support"].parent == client


def test_an_apps_span_whose_caller_is_another_process_keeps_its_parent(
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    made, passed = provider
    caller = SpanContext(0x1234, 0x99, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    with made.get_tracer("app").start_as_current_span(
            "POST /first", context=trace.set_span_in_context(NonRecordingSpan(caller))) as first:
        pass
    _agent_run(made, _as_remote(first))
    assert _by_name(passed)["POST /first"].parent == caller, "the caller's own spans may reach MLflow"


def test_a_span_made_after_the_run_under_a_remote_parent_gets_no_summary(
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    made, passed = provider
    client = _client_span(made)
    _agent_run(made, _as_remote(client))
    with made.get_tracer("temporalio").start_as_current_span("CompleteWorkflow:Support",
                                                             context=_as_remote(client)):
        pass
    assert "input.value" not in (_by_name(passed)["CompleteWorkflow:Support"].attributes or {})


def test_the_kept_spans_of_traces_without_an_agent_are_bounded() -> None:
    provider = TracerProvider()
    ended = EndedTraces(max_spans=10)
    for index in range(30):
        with provider.get_tracer("app").start_as_current_span(f"GET /health {index}") as span:
            pass
        assert isinstance(span, ReadableSpan)
        ended.keep(span.get_span_context().trace_id, [span])
    assert ended._spans == 10 and len(ended._ended) == 10


def test_an_activitys_span_ending_mid_run_does_not_end_the_trace(
        provider: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    made, passed = provider
    client = _client_span(made)
    with made.get_tracer(PYDANTIC_AI_SCOPE).start_as_current_span("invoke_agent support",
                                                                  context=_as_remote(client)) as run:
        with made.get_tracer("temporalio").start_as_current_span("StartActivity:model_request") as start:
            pass
        with made.get_tracer("temporalio").start_as_current_span("RunActivity:model_request",
                                                                 context=_as_remote(start)):
            pass
        assert "StartWorkflow:Support" not in _by_name(passed), "held until the run ends"
        run.set_attribute("pydantic_ai.all_messages", MESSAGES)
        run.set_attribute("final_result", "Sunny.")
    root = _by_name(passed)["StartWorkflow:Support"]
    assert root.attributes is not None and root.attributes["output.value"] == "Sunny."
    assert "output.value" not in (_by_name(passed)["RunActivity:model_request"].attributes or {})
