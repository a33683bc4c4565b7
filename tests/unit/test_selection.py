"""In-process: which spans TraceSelection passes on, and what it holds meanwhile (no MLflow, no
subprocess)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from traced_run.spans import selection
from traced_run.spans.selection import PYDANTIC_AI_SCOPE, TRACE_NAME_TAG, TraceSelection


class Passed(InMemorySpanExporter):
    def names(self) -> list[str]:
        return [span.name for span in self.get_finished_spans()]

    def by_name(self, name: str) -> ReadableSpan:
        (span,) = [span for span in self.get_finished_spans() if span.name == name]
        return span


@pytest.fixture
def setup() -> Iterator[tuple[TracerProvider, TraceSelection, Passed]]:
    passed = Passed()
    chosen = TraceSelection(SimpleSpanProcessor(passed), service_name="svc", max_waiting=100)
    provider = TracerProvider()
    provider.add_span_processor(chosen)
    yield provider, chosen, passed
    provider.shutdown()


def test_a_trace_without_an_agent_is_dropped_and_not_held(setup: tuple[TracerProvider, TraceSelection,
                                                                         Passed]) -> None:
    provider, chosen, passed = setup
    app = provider.get_tracer("app")
    for _ in range(50):
        with app.start_as_current_span("GET /health"), app.start_as_current_span("db"):
            pass
    assert passed.names() == []
    assert chosen._held._spans == 0 and not chosen._held._waiting


def test_an_agent_trace_goes_whole_with_the_spans_that_ended_before_the_agent_started(
        setup: tuple[TracerProvider, TraceSelection, Passed]) -> None:
    provider, _, passed = setup
    app = provider.get_tracer("app")
    agent = provider.get_tracer(PYDANTIC_AI_SCOPE)
    with app.start_as_current_span("POST /chat"):
        with app.start_as_current_span("load session"):
            pass
        with agent.start_as_current_span("invoke_agent support") as run:
            run.set_attribute("gen_ai.agent.name", "support")
            run.set_attribute("pydantic_ai.all_messages", '[{"role":"user","parts":[{"type":"text",'
                                                          '"content":"old"}]},{"role":"assistant","parts":[]},'
                                                          '{"role":"user","parts":[{"type":"text",'
                                                          '"content":"Hello?"}]}]')
            run.set_attribute("final_result", "Hi.")
            with agent.start_as_current_span("chat test"):
                pass
    assert passed.names() == ["load session", "chat test", "invoke_agent support", "POST /chat"]
    root = passed.by_name("POST /chat")
    assert root.attributes is not None
    assert root.attributes["input.value"] == "Hello?", "the run's prompt, not its history"
    assert root.attributes["output.value"] == "Hi."
    assert root.attributes[TRACE_NAME_TAG] == "support"
    assert root.resource.attributes["service.name"] == "svc", "not the SDK's unknown_service"
    assert "input.value" not in (passed.by_name("invoke_agent support").attributes or {})


def test_the_apps_service_name_is_kept() -> None:
    passed = Passed()
    provider = TracerProvider(resource=Resource.create({"service.name": "chat-api"}))
    provider.add_span_processor(TraceSelection(SimpleSpanProcessor(passed), service_name="svc"))
    with provider.get_tracer(PYDANTIC_AI_SCOPE).start_as_current_span("invoke_agent a"):
        pass
    assert passed.get_finished_spans()[0].resource.attributes["service.name"] == "chat-api"


def test_waiting_spans_are_bounded_and_an_agent_after_the_bound_is_said(
        setup: tuple[TracerProvider, TraceSelection, Passed], capfd: pytest.CaptureFixture[str]) -> None:
    provider, chosen, passed = setup
    app = provider.get_tracer("app")
    agent = provider.get_tracer(PYDANTIC_AI_SCOPE)
    with app.start_as_current_span("websocket"):  # a long-lived root: its children wait for a decision
        for index in range(1000):
            with app.start_as_current_span(f"message {index}"):
                pass
        assert chosen._held._spans == 100
        with agent.start_as_current_span("invoke_agent late"):
            pass
    names = passed.names()
    assert names[:100] == [f"message {index}" for index in range(900, 1000)], "the newest waiting spans go"
    assert names[100:] == ["invoke_agent late", "websocket"]
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("traced-run: an agent ran in a trace after 900 of its earlier")


def test_spans_ending_after_their_root_follow_its_decision(setup: tuple[TracerProvider, TraceSelection,
                                                                        Passed]) -> None:
    provider, _, passed = setup
    app = provider.get_tracer("app")
    agent = provider.get_tracer(PYDANTIC_AI_SCOPE)
    with app.start_as_current_span("no agent"):
        late_plain = app.start_span("fire and forget")
    with app.start_as_current_span("with agent"):
        with agent.start_as_current_span("invoke_agent a"):
            pass
        late_agent = app.start_span("background task")
    late_plain.end()
    late_agent.end()
    assert passed.names() == ["invoke_agent a", "with agent", "background task"]


def test_decisions_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch,
                                          setup: tuple[TracerProvider, TraceSelection, Passed]) -> None:
    monkeypatch.setattr(selection, "MAX_DECIDED", 10)
    provider, chosen, _ = setup
    for _ in range(50):
        with provider.get_tracer("app").start_as_current_span("request"):
            pass
    assert len(chosen._decided) == 10


def test_open_root_is_an_agent_traces_open_root_ended_as_left_open_changing_nothing(
        setup: tuple[TracerProvider, TraceSelection, Passed]) -> None:
    provider, chosen, passed = setup
    app = provider.get_tracer("app")
    agent = provider.get_tracer(PYDANTIC_AI_SCOPE)
    idle = app.start_span("websocket with no agent")
    root = app.start_span("POST /chat")
    run = agent.start_span("invoke_agent a", context=_context(root))
    with agent.start_as_current_span("chat test", context=_context(run)) as chat:
        chat.set_attribute("gen_ai.input.messages", '[{"role":"user","parts":[{"type":"text",'
                                                    '"content":"Cut off?"}]}]')
    assert chosen.open_root(idle.get_span_context().trace_id) is None, "not an agent trace"
    left = chosen.open_root(root.get_span_context().trace_id)
    assert left is not None and left.name == "POST /chat" and left.end_time is not None
    assert (left.status.status_code, left.status.description) == (StatusCode.ERROR, selection.LEFT_OPEN)
    assert (left.attributes or {})["input.value"] == "Cut off?"
    assert passed.names() == ["chat test"], "nothing is ended or sent"
    run.end()
    root.end()
    assert chosen.open_root(root.get_span_context().trace_id) is None, "it ended"
    assert passed.by_name("POST /chat").status.status_code is StatusCode.UNSET
    idle.end()


def test_open_roots_are_found_among_many_open_spans_and_forgotten_with_them(
        monkeypatch: pytest.MonkeyPatch, setup: tuple[TracerProvider, TraceSelection, Passed]) -> None:
    monkeypatch.setattr(selection, "MAX_OPEN", 40)
    provider, chosen, _ = setup
    app = provider.get_tracer("app")
    agent = provider.get_tracer(PYDANTIC_AI_SCOPE)
    roots = []
    for index in range(30):  # 30 long-open agent traces, each root with a child open under it
        root = app.start_span(f"session {index}")
        agent.start_span("invoke_agent a", context=_context(root))
        roots.append(root)
    forgotten, kept = roots[:10], roots[10:]  # past MAX_OPEN the oldest open spans are forgotten
    for root in forgotten:
        assert chosen.open_root(root.get_span_context().trace_id) is None
    for root in kept:
        left = chosen.open_root(root.get_span_context().trace_id)
        assert left is not None and left.name == root.name
    assert len(chosen._open._roots) == len(kept), "a forgotten root leaves the index too"
    assert chosen.interrupt("test") == 40
    assert chosen._open._roots == {} and chosen._open.by_id == {}


def test_interrupt_ends_the_open_spans_of_agent_traces_only(setup: tuple[TracerProvider, TraceSelection,
                                                                         Passed]) -> None:
    provider, chosen, passed = setup
    app = provider.get_tracer("app")
    agent = provider.get_tracer(PYDANTIC_AI_SCOPE)
    idle = app.start_span("websocket with no agent")
    root = app.start_span("POST /chat")
    with app.start_as_current_span("child", context=_context(root)):
        pass
    run = agent.start_span("invoke_agent a", context=_context(root))
    with agent.start_as_current_span("chat test", context=_context(run)) as chat:
        chat.set_attribute("gen_ai.input.messages", '[{"role":"user","parts":[{"type":"text",'
                                                    '"content":"Cut off?"}]}]')
    tool = agent.start_span("execute_tool slow", context=_context(run))
    assert chosen.interrupt("SIGTERM") == 3
    assert passed.names() == ["child", "chat test", "execute_tool slow", "invoke_agent a", "POST /chat"]
    for name in ("execute_tool slow", "invoke_agent a", "POST /chat"):
        span = passed.by_name(name)
        assert span.status.description == "interrupted: SIGTERM" and span.end_time is not None
    assert (passed.by_name("POST /chat").attributes or {})["input.value"] == "Cut off?"
    assert chosen.interrupt("process exit") == 0, "each open span is ended once"
    for span in (tool, run, root, idle):
        span.end()
    # A run that goes on after all (the app's own SIGTERM handler let it finish) sends its real
    # ends too, under the same span ids: MLflow stores a span once, so the real end wins.
    assert passed.names()[5:] == ["execute_tool slow", "invoke_agent a", "POST /chat"]


def _context(span: object) -> object:
    from opentelemetry import trace

    return trace.set_span_in_context(span)  # type: ignore[arg-type]


def test_a_forked_child_never_ends_its_parents_open_spans(setup: tuple[TracerProvider, TraceSelection,
                                                                       Passed]) -> None:
    import os

    provider, chosen, passed = setup
    with provider.get_tracer(PYDANTIC_AI_SCOPE).start_as_current_span("invoke_agent a"):
        child = os.fork()
        if child == 0:
            os._exit(chosen.interrupt("os._exit"))  # how many it ended, as its exit status
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert passed.names() == ["invoke_agent a"]


def test_a_cancellation_passing_through_a_span_makes_it_error_one_handled_before_it_started_does_not(
        setup: tuple[TracerProvider, TraceSelection, Passed]) -> None:
    import asyncio

    from opentelemetry.trace import StatusCode

    provider, _, passed = setup
    agent = provider.get_tracer(PYDANTIC_AI_SCOPE)
    quiet = {"record_exception": False, "set_status_on_exception": False}  # as pydantic-ai opens its spans
    with pytest.raises(asyncio.CancelledError), agent.start_as_current_span("invoke_agent cut", **quiet):
        raise asyncio.CancelledError("timeout graceful shutdown exceeded")
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        with agent.start_as_current_span("invoke_agent cleanup"):
            pass
    with pytest.raises(RuntimeError), agent.start_as_current_span("invoke_agent failed", **quiet):
        raise RuntimeError("pydantic-ai records an Exception itself")
    cut = passed.by_name("invoke_agent cut").status
    assert (cut.status_code, cut.description) == (StatusCode.ERROR, "interrupted: CancelledError")
    for name in ("invoke_agent cleanup", "invoke_agent failed"):
        assert passed.by_name(name).status.status_code is StatusCode.UNSET, name
