"""Apps that instrument pydantic-ai themselves (logfire, their own
OpenTelemetry, the seed's manual recipe, MLflow's autolog) still get exactly
one MLflow trace per agent run, and their own destination gets exactly what it
gets without traced-run. Traces with no agent in them never reach MLflow.

Each app keeps an in-memory exporter on its own provider and prints, as its
last line, what that exporter got (names and attributes, ids left out); the
same app run without traced-run must print the same line.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
from conftest import App, clean_env, free_port, request, serving, spans_by_type, traced_env

MINE = """
    import json
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    mine = InMemorySpanExporter()


    def show_mine():
        spans = [[s.name, sorted([k, str(v)] for k, v in (s.attributes or {}).items()
                                 if not k.endswith(".id"))] for s in mine.get_finished_spans()]
        print(json.dumps(sorted(spans)))
"""

OWN_PROVIDER = """
    from opentelemetry.sdk.trace import TracerProvider

    own = TracerProvider()
    own.add_span_processor(SimpleSpanProcessor(mine))
"""

GLOBAL_PROVIDER = OWN_PROVIDER + """
    from opentelemetry import trace

    trace.set_tracer_provider(own)
"""

LOGFIRE = """
    import logfire

    logfire.configure(send_to_logfire=False, console=False,
                      additional_span_processors=[SimpleSpanProcessor(mine)])
"""

LOGFIRE_CONSOLE = """
    import logfire

    logfire.configure(send_to_logfire="if-token-present",
                      additional_span_processors=[SimpleSpanProcessor(mine)])
"""

INSTRUMENT = "logfire.instrument_pydantic_ai()\n"
OWN_FOR_ALL = "Agent.instrument_all(InstrumentationSettings(tracer_provider=own))\n"

PYDANTIC_AI = """
    from pydantic_ai import Agent
    from pydantic_ai.models.instrumented import InstrumentationSettings, InstrumentedModel
    from pydantic_ai.models.test import TestModel
"""


def agent(name: str, model: str = "TestModel()") -> str:
    return f"""
    {name} = Agent({model}, name="{name}", instructions="Be brief.")


    @{name}.tool_plain
    def lookup_{name}(city: str) -> str:
        \"\"\"Look a city up.\"\"\"
        return f"{{city}}: sunny"
"""


def runs(*names: str) -> str:
    return "".join(f'\n    print({name}.run_sync("Weather in Paris, {name}?").output)' for name in names)


def source(*parts: str) -> str:
    return "".join(textwrap.dedent(part) for part in (*parts, "\nshow_mine()\n"))


CASES: dict[str, tuple[str, int]] = {
    "logfire-before-agents": (source(MINE, LOGFIRE, PYDANTIC_AI, INSTRUMENT,
                                     agent("one"), runs("one", "one")), 2),
    "logfire-after-agents": (source(MINE, PYDANTIC_AI, agent("one"), LOGFIRE,
                                    INSTRUMENT, runs("one", "one")), 2),
    "logfire-if-token-present": (source(MINE, LOGFIRE_CONSOLE, PYDANTIC_AI, INSTRUMENT,
                                        agent("one"), runs("one")), 1),
    "logfire-one-agent-it-runs-first": (source(MINE, LOGFIRE, PYDANTIC_AI, agent("one"), agent("two"),
                                               "logfire.instrument_pydantic_ai(one)\n",
                                               runs("one", "two", "one")), 3),
    "logfire-one-agent-other-runs-first": (source(MINE, LOGFIRE, PYDANTIC_AI, agent("one"), agent("two"),
                                                  "logfire.instrument_pydantic_ai(one)\n",
                                                  runs("two", "one", "two")), 3),
    "instrument-all-own-provider-before-agents": (source(
        MINE, OWN_PROVIDER, PYDANTIC_AI, OWN_FOR_ALL,
        agent("one"), runs("one", "one")), 2),
    "instrument-all-own-provider-after-agents": (source(
        MINE, OWN_PROVIDER, PYDANTIC_AI, agent("one"),
        OWN_FOR_ALL, runs("one")), 1),
    "instrument-all-global-provider": (source(MINE, PYDANTIC_AI, agent("one"), GLOBAL_PROVIDER,
                                              "Agent.instrument_all()\n", runs("one")), 1),
    "instrument-all-no-provider-anywhere": (source(MINE, PYDANTIC_AI, "Agent.instrument_all()\n",
                                                   agent("one"), runs("one")), 1),
    "agent-instrument-attribute": (source(
        MINE, OWN_PROVIDER, PYDANTIC_AI, agent("one"), agent("two"),
        "one.instrument = InstrumentationSettings(tracer_provider=own, version=3)\n", runs("one", "two")), 2),
    "instrumented-model": (source(
        MINE, OWN_PROVIDER, PYDANTIC_AI,
        agent("one", "InstrumentedModel(TestModel(), InstrumentationSettings(tracer_provider=own))"),
        runs("one")), 1),
}


def _last_line(output: bytes) -> str:
    return output.decode().rstrip("\n").splitlines()[-1]


def _run_both(app: App, code: str, plain_env: dict[str, str] | None = None, **env: str) -> tuple[str, str]:
    """The app's own exporter's line without traced-run, then with it (after checking that run)."""
    app.write(code)
    plain = app.run("python", "app.py", env=clean_env(**(plain_env or env)), launcher=False)
    assert plain.returncode == 0, plain.stderr.decode()
    traced = app.run("python", "app.py", env=traced_env(app, **env))
    assert traced.returncode == 0, traced.stderr.decode()
    assert b"traced-run:" not in traced.stderr, traced.stderr.decode()
    return _last_line(plain.stdout), _last_line(traced.stdout)


def _assert_agent_trace(trace: Any) -> None:
    kinds = spans_by_type(trace)
    assert len(kinds["AGENT"]) == 1, [s.name for s in trace.data.spans]
    assert len(kinds["LLM"]) == 2 and len(kinds["TOOL"]) == 1, [s.name for s in trace.data.spans]
    assert len({s.span_id for s in trace.data.spans}) == len(trace.data.spans)


@pytest.mark.parametrize("case", list(CASES))
def test_app_instrumenting_pydantic_ai_itself_gets_one_trace_per_run(app: App, case: str) -> None:
    code, expected = CASES[case]
    plain, traced = _run_both(app, code)
    assert traced == plain, "the app's own exporter gets exactly what it gets without traced-run"
    traces = app.traces(expected)
    for trace in traces:
        _assert_agent_trace(trace)
    prompts = sorted(str(t.info.request_preview) for t in traces)
    assert all("Weather in Paris" in prompt for prompt in prompts), prompts


SEED_RECIPE = """
    import os

    from openinference.instrumentation.pydantic_ai import OpenInferenceSpanProcessor
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    own.add_span_processor(OpenInferenceSpanProcessor())
    own.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
        endpoint=os.environ["APP_MLFLOW"] + "/v1/traces",
        headers={"x-mlflow-experiment-id": os.environ["APP_EXPERIMENT_ID"]},
    )))
"""


def test_the_seed_recipe_left_in_the_app_gives_one_trace_per_run(app: App) -> None:
    client = app.server.client()
    experiment_id = client.create_experiment(app.experiment)
    untraced_id = client.create_experiment(app.experiment + "-untraced")
    code = source(MINE, GLOBAL_PROVIDER, SEED_RECIPE, PYDANTIC_AI,
                  "Agent.instrument_all(InstrumentationSettings(version=2))\n", agent("one"),
                  runs("one", "one"), "\nown.force_flush()\n")
    plain, traced = _run_both(app, code, {"APP_MLFLOW": app.server.url, "APP_EXPERIMENT_ID": untraced_id},
                              APP_MLFLOW=app.server.url, APP_EXPERIMENT_ID=experiment_id)
    assert traced == plain
    recipe_alone = app.server.wait_traces(untraced_id, 2, by_name=False)
    assert len(recipe_alone) == 2, "the recipe alone: a trace per run"
    shown = json.loads(traced)
    kinds = [dict(attributes).get("openinference.span.kind") for _, attributes in shown]
    assert sorted(kinds) == ["AGENT", "AGENT", "LLM", "LLM", "LLM", "LLM", "TOOL", "TOOL"], \
        "the app's own OpenInference processor still shapes its spans, once"
    for trace in app.traces(2):
        _assert_agent_trace(trace)
        for span in trace.data.spans:
            assert isinstance(span.attributes.get("openinference.span.kind"), str)


@pytest.mark.parametrize(("by", "first"), [("name", "provider"), ("id", "pydantic-ai")])
def test_the_seed_recipe_into_another_experiment_is_said_and_its_traces_stay_there(
        app: App, by: str, first: str) -> None:
    """``first``: pydantic-ai imported first, traced-run joins the provider the app sets
    before the app adds its exporter to it."""
    client = app.server.client()
    theirs = client.create_experiment(app.experiment + "-app")
    setup = (GLOBAL_PROVIDER, SEED_RECIPE, PYDANTIC_AI) if first == "provider" else (
        PYDANTIC_AI, GLOBAL_PROVIDER, SEED_RECIPE)
    code = source(MINE, *setup, "Agent.instrument_all(InstrumentationSettings(version=2))\n", agent("one"),
                  runs("one", "one"), "\nown.force_flush()\n")
    app.write(code)
    if by == "name":
        env, ours = traced_env(app), repr(app.experiment)
    else:
        ours = client.create_experiment(app.experiment)
        env = traced_env(app, experiment=False, MLFLOW_EXPERIMENT_ID=ours)
    done = app.run("python", "app.py", env={**env, "APP_MLFLOW": app.server.url, "APP_EXPERIMENT_ID": theirs})
    assert done.returncode == 0, done.stderr.decode()
    said = [line for line in done.stderr.decode().splitlines() if line.startswith("traced-run:")]
    assert len(said) == 1, said
    assert f"experiment {theirs} of the same MLflow" in said[0] and f"its own experiment {ours}" in said[0]
    for trace in app.server.wait_traces(theirs, 2, by_name=False):
        _assert_agent_trace(trace)
    # The process has exited: whatever traced-run sent has arrived.
    assert by == "id" or app.server.experiment_id(app.experiment) is None, "nothing sent, nothing created"
    assert by == "name" or app.server.traces(str(ours)) == []


OWN_NAMED_PROVIDER = """
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": "own-svc"})))
"""


@pytest.mark.parametrize(("provider", "env", "expected"), [
    (OWN_NAMED_PROVIDER, {"OTEL_SERVICE_NAME": "env-svc"}, "own-svc"),
    ("", {"OTEL_RESOURCE_ATTRIBUTES": "service.name=attrs-svc,team=ml"}, "attrs-svc"),
], ids=["the-apps-provider", "otel-resource-attributes"])
def test_an_agent_nobody_instruments_carries_the_service_name_someone_chose(
        app: App, provider: str, env: dict[str, str], expected: str) -> None:
    app.write(source(MINE, provider, PYDANTIC_AI, agent("one"), runs("one")))
    done = app.run("python", "app.py", env=traced_env(app, **env))
    assert done.returncode == 0, done.stderr.decode()
    (trace,) = app.traces(1)
    assert trace.info.tags.get("service.name") == expected


# --- only agent traces, whole ------------------------------------------------------------

AROUND_AN_AGENT = """
    tracer = own.get_tracer("app")

    def healthcheck():
        with tracer.start_as_current_span("GET /health"):
            with tracer.start_as_current_span("db ping"):
                pass

    for _ in range(3):
        healthcheck()
    with tracer.start_as_current_span("POST /chat"):
        with tracer.start_as_current_span("load session"):
            pass
        print(one.run_sync("Weather in Paris, one?").output)
    for _ in range(3):
        healthcheck()
"""


@pytest.mark.parametrize("setup", ["before-import", "after-first-run"])
def test_only_traces_with_an_agent_reach_mlflow_whole_and_readable(app: App, setup: str) -> None:
    if setup == "before-import":
        code = source(MINE, GLOBAL_PROVIDER, PYDANTIC_AI, agent("one"), AROUND_AN_AGENT)
    else:
        # The app's provider comes after a first agent run: the decision must not depend on it.
        code = source(MINE, PYDANTIC_AI, agent("one"), runs("one"), GLOBAL_PROVIDER, AROUND_AN_AGENT)
    app.write(code)
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    assert b"traced-run:" not in done.stderr, done.stderr.decode()
    expected = 1 if setup == "before-import" else 2
    traces = app.traces(expected)
    chat = [t for t in traces if any(s.name == "POST /chat" for s in t.data.spans)]
    assert len(chat) == 1, [sorted(s.name for s in t.data.spans) for t in traces]
    (trace,) = chat
    names = sorted(s.name for s in trace.data.spans)
    assert names == ["POST /chat", "chat test", "chat test", "execute_tool lookup_one", "invoke_agent one",
                     "load session"]
    (root,) = [s for s in trace.data.spans if s.parent_id is None]
    assert root.name == "POST /chat"
    assert "Weather in Paris, one?" in str(trace.info.request_preview)
    assert "sunny" in str(trace.info.response_preview)
    assert trace.info.tags.get("mlflow.traceName") == "one"
    assert trace.info.tags.get("service.name") == "app", "traced-run's default, not unknown_service"


def test_the_apps_service_name_is_kept(app: App) -> None:
    code = source(MINE, GLOBAL_PROVIDER, PYDANTIC_AI, agent("one"), AROUND_AN_AGENT)
    named = "TracerProvider(resource=Resource({'service.name': 'chat-api'}))"
    app.write(code.replace("TracerProvider()", named)
              .replace("from opentelemetry.sdk.trace import TracerProvider",
                       "from opentelemetry.sdk.resources import Resource\n"
                       "from opentelemetry.sdk.trace import TracerProvider"))
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    (trace,) = app.traces(1)
    assert trace.info.tags.get("service.name") == "chat-api"


def test_a_process_that_runs_no_agent_creates_no_experiment(app: App) -> None:
    code = source(MINE, GLOBAL_PROVIDER, PYDANTIC_AI, agent("one"),
                  AROUND_AN_AGENT.split('    with tracer.start_as_current_span("POST /chat")')[0])
    app.write(code)
    done = app.run("python", "app.py", env=traced_env(app, exit_timeout="10"))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    assert app.server.experiment_id(app.experiment) is None


def test_traced_run_privacy_holds_for_an_apps_own_instrumentation(app: App) -> None:
    code = source(MINE, LOGFIRE, PYDANTIC_AI, INSTRUMENT, agent("one"),
                  'print(one.run_sync("My password=hunter2, weather in Paris?").output)\n')
    plain, traced = _run_both(app, code, TRACED_RUN_INCLUDE_CONTENT="false")
    assert traced == plain and "hunter2" in plain, "the app's own destination keeps its content"
    (trace,) = app.traces(1)
    stored = json.dumps([[s.name, s.attributes, s.inputs, s.outputs] for s in trace.data.spans], default=str)
    assert "hunter2" not in stored and "Paris" not in stored and "sunny" not in stored
    assert sorted(str(s.span_type) for s in trace.data.spans) == ["AGENT", "LLM", "LLM", "TOOL"]


def test_redaction_holds_for_an_apps_own_instrumentation(app: App) -> None:
    code = source(MINE, LOGFIRE, PYDANTIC_AI, INSTRUMENT, agent("one"),
                  'print(one.run_sync("Use the key sk-abcdefghijklmnopqrstuvwx1234 in Paris").output)\n')
    plain, traced = _run_both(app, code)
    assert traced == plain
    (trace,) = app.traces(1)
    stored = json.dumps([[s.attributes, s.inputs, s.outputs] for s in trace.data.spans], default=str)
    assert "sk-abcdefghijklmnopqrstuvwx1234" not in stored
    assert "Paris" in stored


class _NotAnSdkProvider:
    """What an app might hand pydantic-ai: a provider traced-run cannot add a processor to."""


def test_a_provider_traced_run_cannot_join_is_said_in_one_line(app: App) -> None:
    app.write(source(MINE, PYDANTIC_AI, """
        from opentelemetry.trace import NoOpTracerProvider

        Agent.instrument_all(InstrumentationSettings(tracer_provider=NoOpTracerProvider()))
        """, agent("one"), runs("one", "one")))
    done = app.run("python", "app.py", env=traced_env(app, exit_timeout="10"))
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("traced-run: "), lines
    assert "NoOpTracerProvider" in lines[0] and "not sent to MLflow" in lines[0]


def test_mlflow_autolog_in_the_app_gives_one_trace_per_run_and_one_line(app: App) -> None:
    app.write(source(MINE, PYDANTIC_AI, """
        import mlflow
        import mlflow.pydantic_ai

        mlflow.pydantic_ai.autolog(silent=True)
        """, agent("one"), runs("one", "one")))
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    ours = [line for line in done.stderr.decode().splitlines() if line.startswith("traced-run:")]
    assert len(ours) == 1 and "autolog" in ours[0] and "leaves those runs to it" in ours[0], ours
    traces = app.traces(2)
    for trace in traces:
        assert len(spans_by_type(trace)["TOOL"]) == 1, [s.name for s in trace.data.spans]
        assert not any(s.name.startswith("invoke_agent") for s in trace.data.spans), "no second copy"


# --- a FastAPI service with its own OpenTelemetry ----------------------------------------

FASTAPI_APP = """
    from fastapi import FastAPI
    from opentelemetry import trace
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    trace.set_tracer_provider(TracerProvider())
    api = FastAPI()
    FastAPIInstrumentor.instrument_app(api)
    support = Agent(TestModel(), name="support", instructions="Be brief.")


    @support.tool_plain
    def balance(customer: str) -> str:
        \"\"\"The customer's balance.\"\"\"
        return "$123.45"


    @api.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}


    @api.post("/chat")
    async def chat(prompt: str) -> dict[str, str]:
        result = await support.run(prompt)
        return {"answer": result.output}
"""


def test_fastapi_with_its_own_instrumentation_one_trace_per_chat_none_for_health(
        app: App, which: Callable[[str], str]) -> None:
    app.write(FASTAPI_APP)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving(app, [which("uvicorn"), "--host", "127.0.0.1", "--port", str(port), "app:api"], port,
                 traced_env(app)) as log:
        for _ in range(3):
            request(f"{base}/health")
        answers = [request(f"{base}/chat?prompt=Balance+of+{who}%3F", "POST") for who in ("Ann", "Bob")]
        for _ in range(3):
            request(f"{base}/health")
    assert all("123.45" in answer for answer in answers), answers
    assert "traced-run:" not in log.read_text(), log.read_text()
    traces = app.traces(2)
    for trace in traces:
        (root,) = [s for s in trace.data.spans if s.parent_id is None]
        assert root.name == "POST /chat", sorted(s.name for s in trace.data.spans)
        kinds = spans_by_type(trace)
        assert len(kinds["AGENT"]) == 1 and len(kinds["LLM"]) == 2 and len(kinds["TOOL"]) == 1
        assert trace.info.tags.get("mlflow.traceName") == "support"
        assert trace.info.tags.get("service.name") == "uvicorn"
        assert "123.45" in str(trace.info.response_preview)
    assert sorted(str(t.info.request_preview) for t in traces) == ['"Balance of Ann?"', '"Balance of Bob?"']
