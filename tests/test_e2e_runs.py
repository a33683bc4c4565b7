"""Every kind of agent run an unchanged app makes arrives in MLflow as exactly
one trace: sync, async, streamed, structured, with tools, from a thread, from
an agent built before the app's own code ran; in the experiment the user chose;
next to the app's own logfire or OpenTelemetry setup, without duplicates.

The run kinds share one app process (module fixture): each run is a trace of
its own, told apart by its prompt."""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import App, MlflowServer, poll, spans_by_type, traced_env

AGENTS_FIRST = """
    # Imported before the app touches pydantic_ai itself: the agent exists
    # before any of the app's own code ran.
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    early = Agent(TestModel(custom_output_text="early answer"), name="early")
"""

RUN_KINDS_APP = """
    import asyncio
    import json
    import threading

    import agents_first
    from pydantic import BaseModel
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel
    from pydantic_ai.models.test import TestModel


    class City(BaseModel):
        name: str
        population: int


    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("async answer")])


    async def stream_words(messages: list[ModelMessage], info: AgentInfo):
        for word in ("streamed ", "in ", "three"):
            yield word


    weather = Agent(TestModel(), name="weather")


    @weather.tool_plain
    def lookup(city: str) -> str:
        \"\"\"Look a city up.\"\"\"
        return f"{city}: sunny"


    asyncer = Agent(FunctionModel(answer), name="asyncer")
    streamer = Agent(FunctionModel(stream_function=stream_words), name="streamer")
    structured = Agent(TestModel(custom_output_args={"name": "Paris", "population": 2100000}),
                       name="structured", output_type=City)


    def report(prompt, result, output):
        usage = result.usage
        print(json.dumps({"prompt": prompt, "output": output, "input_tokens": usage.input_tokens,
                          "output_tokens": usage.output_tokens}), flush=True)


    async def main():
        result = await asyncer.run("Say something")
        report("Say something", result, result.output)
        async with streamer.run_stream("Stream please") as streamed:
            chunks = [chunk async for chunk in streamed.stream_text(delta=True, debounce_by=None)]
        report("Stream please", streamed, chunks)
        result = await structured.run("Biggest city?")
        report("Biggest city?", result, result.output.model_dump())


    result = weather.run_sync("Weather in Paris?")
    report("Weather in Paris?", result, result.output)
    asyncio.run(main())
    result = agents_first.early.run_sync("Early?")
    report("Early?", result, result.output)
    box = []
    worker = threading.Thread(target=lambda: box.append(weather.run_sync("From a thread")))
    worker.start()
    worker.join()
    report("From a thread", box[0], box[0].output)
"""

PROMPTS = ("Weather in Paris?", "Say something", "Stream please", "Biggest city?", "Early?", "From a thread")


@dataclass
class KindsRun:
    app: App
    done: subprocess.CompletedProcess[bytes]
    reported: dict[str, dict[str, Any]]
    """What the app itself printed about each run, by prompt."""
    traces: dict[str, Any]
    """The MLflow trace of each run, by the prompt its agent span got."""
    existed_before: bool


def agent_root(trace: Any) -> Any:
    (root,) = [span for span in trace.data.spans if span.parent_id is None]
    return root


@pytest.fixture(scope="module")
def kinds(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> KindsRun:
    app = App(tmp_path_factory.mktemp("kinds"), mlflow_server, f"kinds-{uuid.uuid4().hex[:12]}")
    existed_before = mlflow_server.experiment_id(app.experiment) is not None
    app.write(AGENTS_FIRST, "agents_first.py")
    app.write(RUN_KINDS_APP)
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    reported = {line["prompt"]: line for line in map(json.loads, done.stdout.decode().splitlines())}
    traces = app.traces(len(PROMPTS))
    return KindsRun(app, done, reported, {agent_root(t).inputs: t for t in traces}, existed_before)


def test_each_run_is_exactly_one_trace_rooted_at_its_agent_span(kinds: KindsRun) -> None:
    assert kinds.done.stderr == b""
    assert sorted(kinds.reported) == sorted(PROMPTS)
    assert sorted(kinds.traces) == sorted(PROMPTS), "one trace per run, none merged, none doubled"
    for prompt, trace in kinds.traces.items():
        root = agent_root(trace)
        assert str(root.span_type) == "AGENT", prompt
        assert len(spans_by_type(trace)["AGENT"]) == 1, prompt
        assert {span.trace_id for span in trace.data.spans} == {trace.info.trace_id}, prompt
        assert str(trace.info.state).endswith("OK"), prompt
        assert trace.info.request_preview == json.dumps(prompt)
        assert trace.info.tags["service.name"] == "app"


def test_sync_run_with_tool_calls_nests_llm_and_tool_spans(kinds: KindsRun) -> None:
    trace = kinds.traces["Weather in Paris?"]
    assert len(trace.data.spans) == 4
    kinds_of = spans_by_type(trace)
    (agent,) = kinds_of["AGENT"]
    assert agent.name == "invoke_agent weather"
    assert agent.outputs == {"lookup": "a: sunny"}
    first, second = sorted(kinds_of["LLM"], key=lambda span: span.start_time_ns)
    (tool,) = kinds_of["TOOL"]
    assert {first.parent_id, second.parent_id, tool.parent_id} == {agent.span_id}
    assert first.start_time_ns < tool.start_time_ns < second.start_time_ns
    assert "Weather in Paris?" in said(first.inputs)
    assert "lookup" in said(first.outputs), "the first model call asks for the tool"
    assert "a: sunny" in said(second.inputs), "the second model call is sent the tool's result"
    assert tool.name == "execute_tool lookup"
    assert tool.inputs == {"city": "a"}
    assert tool.outputs == "a: sunny"
    assert "a: sunny" in said(second.outputs)
    assert trace.info.response_preview == '{"lookup":"a: sunny"}'


def test_async_run(kinds: KindsRun) -> None:
    trace = kinds.traces["Say something"]
    agent, llm = _agent_and_one_llm(trace)
    assert agent.name == "invoke_agent asyncer"
    assert agent.outputs == "async answer"
    assert "Say something" in said(llm.inputs)
    assert "async answer" in said(llm.outputs)
    assert kinds.reported["Say something"]["output"] == "async answer"


def test_streamed_run_keeps_its_chunks_and_traces_the_whole_text(kinds: KindsRun) -> None:
    assert kinds.reported["Stream please"]["output"] == ["streamed ", "in ", "three"]
    trace = kinds.traces["Stream please"]
    agent, llm = _agent_and_one_llm(trace)
    assert agent.name == "invoke_agent streamer"
    assert agent.outputs == "streamed in three"
    assert "streamed in three" in said(llm.outputs)
    assert trace.info.response_preview == '"streamed in three"'


def test_structured_output_is_the_traced_output(kinds: KindsRun) -> None:
    city = {"name": "Paris", "population": 2100000}
    assert kinds.reported["Biggest city?"]["output"] == city
    trace = kinds.traces["Biggest city?"]
    agent, llm = _agent_and_one_llm(trace)
    assert agent.name == "invoke_agent structured"
    assert agent.outputs == city
    assert "Paris" in said(llm.outputs) and "2100000" in said(llm.outputs)


def test_agents_are_told_apart_by_name(kinds: KindsRun) -> None:
    agents = {"Weather in Paris?": "weather", "Say something": "asyncer", "Stream please": "streamer",
              "Biggest city?": "structured", "Early?": "early", "From a thread": "weather"}
    assert {prompt: agent_root(t).name for prompt, t in kinds.traces.items()} == \
        {prompt: f"invoke_agent {name}" for prompt, name in agents.items()}
    assert {prompt: t.info.tags.get("mlflow.traceName") for prompt, t in kinds.traces.items()} == agents


def test_agent_built_in_a_module_imported_first_is_traced(kinds: KindsRun) -> None:
    agent, llm = _agent_and_one_llm(kinds.traces["Early?"])
    assert agent.outputs == "early answer"
    assert "early answer" in said(llm.outputs)


def test_run_in_a_thread_is_its_own_complete_trace(kinds: KindsRun) -> None:
    threaded = kinds.traces["From a thread"]
    in_main = kinds.traces["Weather in Paris?"]
    assert threaded.info.trace_id != in_main.info.trace_id
    assert sorted(str(s.span_type) for s in threaded.data.spans) == ["AGENT", "LLM", "LLM", "TOOL"]
    agent = agent_root(threaded)
    assert {s.parent_id for s in threaded.data.spans if s is not agent} == {agent.span_id}
    assert agent.outputs == {"lookup": "a: sunny"}


def test_token_usage_is_what_the_app_saw(kinds: KindsRun) -> None:
    for prompt, trace in kinds.traces.items():
        seen = kinds.reported[prompt]
        usage = trace.info.token_usage
        assert seen["input_tokens"] > 0, prompt
        assert usage["input_tokens"] == seen["input_tokens"], prompt
        assert usage["output_tokens"] == seen["output_tokens"], prompt
        assert usage["total_tokens"] == seen["input_tokens"] + seen["output_tokens"], prompt


def test_experiment_named_but_missing_is_created(kinds: KindsRun) -> None:
    assert not kinds.existed_before
    experiment_id = kinds.app.server.experiment_id(kinds.app.experiment)
    assert experiment_id is not None
    assert experiment_id != "0"
    assert len(kinds.app.server.traces(experiment_id)) == len(PROMPTS)


def said(value: Any) -> str:
    """A span's inputs or outputs as text: the tests ask what was said, not in
    which message shape (test_trace_quality owns that)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _agent_and_one_llm(trace: Any) -> tuple[Any, Any]:
    kinds_of = spans_by_type(trace)
    assert sorted(kinds_of) == ["AGENT", "LLM"]
    (agent,) = kinds_of["AGENT"]
    (llm,) = kinds_of["LLM"]
    assert llm.parent_id == agent.span_id
    return agent, llm


# --- where the trace goes ------------------------------------------------------

def _prompted_app(prompt: str) -> str:
    return f"""
        from pydantic_ai import Agent
        from pydantic_ai.models.test import TestModel

        agent = Agent(TestModel(custom_output_text="done"), name="placed")
        print(agent.run_sync({prompt!r}).output)
    """


def _run_placed(app: App, env: dict[str, str]) -> str:
    """Run an agent whose prompt no other test uses; return that prompt."""
    prompt = f"where does this go {uuid.uuid4().hex}"
    app.write(_prompted_app(prompt))
    done = app.run("python", "app.py", env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"done\n"
    assert done.stderr == b""
    return prompt


def test_existing_experiment_by_name_is_used_not_recreated(app: App) -> None:
    created = str(app.server.client().create_experiment(app.experiment))
    prompt = _run_placed(app, traced_env(app))
    (trace,) = app.server.wait_traces(created, 1, by_name=False)
    assert trace.info.request_preview == json.dumps(prompt)
    assert app.server.experiment_id(app.experiment) == created


def test_experiment_by_id(app: App) -> None:
    experiment_id = str(app.server.client().create_experiment(app.experiment))
    env = traced_env(app, experiment=False, MLFLOW_EXPERIMENT_ID=experiment_id)
    prompt = _run_placed(app, env)
    (trace,) = app.server.wait_traces(experiment_id, 1, by_name=False)
    assert trace.info.request_preview == json.dumps(prompt)


def test_no_experiment_given_means_experiment_zero(app: App) -> None:
    # Experiment 0 is shared (the fixture's warm-up trace lands there, complete
    # or not): wait for the traces that are new, and only those.
    before = {t.info.trace_id for t in app.server.traces("0")}
    env = traced_env(app, experiment=False)
    prompt = _run_placed(app, env)

    def arrived() -> list[Any] | None:
        new = [t for t in app.server.traces("0") if t.info.trace_id not in before]
        return new if new and all(str(t.info.state).endswith(("OK", "ERROR")) for t in new) else None

    (new,) = poll(arrived, timeout=30, what="the new trace in experiment 0")
    assert new.info.request_preview == json.dumps(prompt)
    assert app.server.experiment_id(app.experiment) is None, "no experiment made up"


# --- next to the app's own tracing ---------------------------------------------

_APP_EXPORTER = """
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    mine = InMemorySpanExporter()
"""

_LOGFIRE_SETUP = """
    import logfire

    logfire.configure(send_to_logfire=False, console=False,
                      additional_span_processors=[SimpleSpanProcessor(mine)])
"""

_SDK_SETUP = """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mine))
    trace.set_tracer_provider(provider)
"""

_IMPORT_AGENT = """
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel
"""

_RUN_AND_SHOW_MINE = """
    import json

    agent = Agent(TestModel(), name="coexisting")

    @agent.tool_plain
    def lookup(city: str) -> str:
        \"\"\"Look a city up.\"\"\"
        return f"{city}: sunny"

    print(agent.run_sync("Weather with my own tracing?").output)
    print(json.dumps([[s.name, s.context.span_id, (s.attributes or {}).get("openinference.span.kind")]
                      for s in mine.get_finished_spans()]))
"""


def _coexisting_app(setup: str, first: str) -> str:
    from textwrap import dedent

    parts = [_APP_EXPORTER, setup, _IMPORT_AGENT] if first == "setup" else \
        [_IMPORT_AGENT, _APP_EXPORTER, setup]
    return "".join(dedent(part) for part in [*parts, _RUN_AND_SHOW_MINE])


@pytest.mark.parametrize(
    ("setup", "first"),
    [(_LOGFIRE_SETUP, "setup"), (_LOGFIRE_SETUP, "import"), (_SDK_SETUP, "import")],
    ids=["logfire-before-import", "logfire-after-import", "sdk-provider-after-import"],
)
def test_app_with_its_own_tracing_keeps_it_and_mlflow_gets_one_trace(app: App, setup: str,
                                                                        first: str) -> None:
    app.write(_coexisting_app(setup, first))
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    assert b"traced-run:" not in done.stderr, done.stderr.decode()
    answer, exported = done.stdout.decode().splitlines()
    assert answer == '{"lookup":"a: sunny"}'

    assert json.loads(exported) == [], "the app did not instrument pydantic-ai: its exporter gets none of it"

    (trace,) = app.traces(1)
    assert sorted(str(s.span_type) for s in trace.data.spans) == ["AGENT", "LLM", "LLM", "TOOL"]
    assert len({s.span_id for s in trace.data.spans}) == 4
    assert agent_root(trace).inputs == "Weather with my own tracing?"
