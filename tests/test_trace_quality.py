"""What a user sees of a traced run in MLflow: LLM spans that read as the
conversation they sent, trace sessions, users, tags, names and the run the
traces belong to, each found again with ``mlflow.search_traces(filter_string=...)``;
and sampling that keeps or drops whole traces."""

from __future__ import annotations

import json
import uuid
from typing import Any

import mlflow
import pytest
from conftest import AGENT, AGENT_APP, App, spans_by_type
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from traced_run.config.settings import Settings
from traced_run.pipeline import sample_ratio

TWO_TURNS = AGENT + """
    first = agent.run_sync("What is the weather in Paris?")
    second = agent.run_sync("And tomorrow?", message_history=first.all_messages())
    print(first.conversation_id)
"""


def search(app: App, filter_string: str, **kwargs: Any) -> list[Any]:
    mlflow.set_tracking_uri(app.server.url)
    experiment_id = app.server.experiment_id(app.experiment)
    return list(mlflow.search_traces(locations=[experiment_id], filter_string=filter_string,
                                     return_type="list", **kwargs))


@pytest.fixture(scope="module")
def two_turns(tmp_path_factory: pytest.TempPathFactory,
              mlflow_server: Any) -> tuple[App, str, str, list[Any]]:
    """One app run, two agent runs of one conversation, with user, tags and a run id."""
    app = App(tmp_path_factory.mktemp("quality"), mlflow_server, f"quality-{uuid.uuid4().hex[:12]}")
    mlflow.set_tracking_uri(mlflow_server.url)
    experiment_id = mlflow.create_experiment(app.experiment)
    run_id = mlflow_server.client().create_run(experiment_id).info.run_id
    app.write(TWO_TURNS)
    done = app.run("python", "app.py", env=app.env(
        TRACED_RUN_USER_ID="alice", TRACED_RUN_TAGS="environment=prod,version=1.4.2",
        OTEL_RESOURCE_ATTRIBUTES="git_commit=abc123", MLFLOW_RUN_ID=run_id))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    conversation_id = done.stdout.decode().strip()
    return app, conversation_id, run_id, app.traces(2)


def ordered(traces: list[Any]) -> list[Any]:
    return sorted(traces, key=lambda t: t.info.request_time)


def test_llm_spans_show_the_conversation_they_sent(two_turns: tuple[App, str, str, list[Any]]) -> None:
    _, _, _, traces = two_turns
    first, second = ordered(traces)
    kinds = spans_by_type(first)
    asking, answering = sorted(kinds["LLM"], key=lambda s: s.start_time_ns)
    system = {"role": "system", "parts": [{"type": "text", "content": "Be brief."}]}
    user = {"role": "user", "parts": [{"type": "text", "content": "What is the weather in Paris?"}]}
    call = {"role": "assistant", "parts": [{"type": "tool_call", "id": "pyd_ai_tool_call_id__lookup",
                                             "name": "lookup", "arguments": {"city": "a"}}]}
    result = {"role": "tool", "parts": [{"type": "tool_call_response", "id": "pyd_ai_tool_call_id__lookup",
                                         "name": "lookup", "response": "a: sunny"}]}
    answer = {"role": "assistant", "parts": [{"type": "text", "content": '{"lookup":"a: sunny"}'}]}
    assert asking.inputs == [system, user]
    assert asking.outputs == [call]
    assert answering.inputs == [system, user, call, result]
    assert answering.outputs == [answer]
    # The agent span keeps the prompt and the answer: the trace list's previews.
    (agent,) = kinds["AGENT"]
    assert agent.inputs == "What is the weather in Paris?"
    assert agent.outputs == {"lookup": "a: sunny"}
    assert first.info.request_preview == '"What is the weather in Paris?"'
    (tool,) = kinds["TOOL"]
    assert (tool.inputs, tool.outputs) == ({"city": "a"}, "a: sunny")
    # The second turn's model calls carry the whole history, the first turn included.
    later = sorted(spans_by_type(second)["LLM"], key=lambda s: s.start_time_ns)[-1]
    said = [part.get("content") for message in later.inputs for part in message["parts"]]
    assert said[:2] == ["Be brief.", "What is the weather in Paris?"] and "And tomorrow?" in said


def test_both_turns_share_the_session_and_carry_user_tags_name_and_run(
        two_turns: tuple[App, str, str, list[Any]]) -> None:
    app, conversation_id, run_id, traces = two_turns
    for trace in traces:
        assert trace.info.trace_metadata["mlflow.trace.session"] == conversation_id
        assert trace.info.trace_metadata["mlflow.trace.user"] == "alice"
        assert trace.info.tags["environment"] == "prod"
        assert trace.info.tags["version"] == "1.4.2"
        assert trace.info.tags["git_commit"] == "abc123"
        assert trace.info.tags["service.name"] == "app"
        assert trace.info.tags["host.name"]
        assert trace.info.tags["mlflow.traceName"] == "support"
    ids = {t.info.trace_id for t in traces}
    filters = [
        f"metadata.`mlflow.trace.session` = '{conversation_id}'",
        "metadata.`mlflow.trace.user` = 'alice'",
        "tags.environment = 'prod'",
        "tags.git_commit = 'abc123'",
        "tags.`service.name` = 'app'",
        "trace.name = 'support'",
        f"trace.run_id = '{run_id}'",
    ]
    for filter_string in filters:
        assert {t.info.trace_id for t in search(app, filter_string)} == ids, filter_string
    assert search(app, "metadata.`mlflow.trace.user` = 'bob'") == []
    assert search(app, "tags.environment = 'staging'") == []
    assert {t.info.trace_id for t in search(app, "", run_id=run_id)} == ids


def test_settings_fix_the_session_and_name_the_traces(app: App) -> None:
    app.write(TWO_TURNS)
    done = app.run("python", "app.py", env=app.env(TRACED_RUN_SESSION_ID="nightly-batch-7",
                                                   TRACED_RUN_TRACE_NAME="nightly"))
    assert done.returncode == 0, done.stderr.decode()
    traces = app.traces(2)
    assert {t.info.trace_metadata["mlflow.trace.session"] for t in traces} == {"nightly-batch-7"}
    found = search(app, "metadata.`mlflow.trace.session` = 'nightly-batch-7' AND trace.name = 'nightly'")
    assert len(found) == 2


SAMPLED = """
    from opentelemetry import trace
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    agent = Agent(TestModel(), name="sampled")

    @agent.tool_plain
    def lookup(city: str) -> str:
        return format(trace.get_current_span().get_span_context().trace_id, "032x")

    for _ in range(24):
        print(agent.run_sync("hi").output)
"""


def test_sampling_keeps_or_drops_whole_traces_by_trace_id(app: App) -> None:
    app.write(SAMPLED)
    done = app.run("python", "app.py", env=app.env(TRACED_RUN_SAMPLE_RATIO="0.5"))
    assert done.returncode == 0, done.stderr.decode()
    ran = [json.loads(line)["lookup"] for line in done.stdout.decode().split()]
    bound = TraceIdRatioBased.get_bound_for_rate(0.5)
    kept = {f"tr-{hex_id}" for hex_id in ran if int(hex_id, 16) & TraceIdRatioBased.TRACE_ID_LIMIT < bound}
    assert len(ran) == 24 and 0 < len(kept) < 24
    traces = app.traces(len(kept))
    assert {t.info.trace_id for t in traces} == kept
    for trace in traces:  # nothing cut: agent, two model calls and the tool, all there
        assert sorted(spans_by_type(trace)) == ["AGENT", "LLM", "TOOL"]
        assert len(trace.data.spans) == 4


def test_otel_sampler_variables_give_the_ratio_unless_the_setting_is_given() -> None:
    settings = Settings()
    assert sample_ratio(settings, "default", {}) == 1.0
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    assert sample_ratio(settings, "default", env) == 0.1
    assert sample_ratio(settings, "default", {"OTEL_TRACES_SAMPLER": "always_off"}) == 0.0
    assert sample_ratio(settings, "default", {"OTEL_TRACES_SAMPLER": "jaeger_remote"}) == 1.0
    assert sample_ratio(Settings(sample_ratio=0.7), "env TRACED_RUN_SAMPLE_RATIO", env) == 0.7


def test_nothing_is_sent_with_a_ratio_of_zero(app: App) -> None:
    app.write(SAMPLED)
    done = app.run("python", "app.py", env=app.env(OTEL_TRACES_SAMPLER="always_off"))
    assert done.returncode == 0, done.stderr.decode()
    # The process has exited, so its delivery is over: whatever was to reach MLflow has.
    experiment_id = app.server.experiment_id(app.experiment)
    assert experiment_id is None or app.server.traces(experiment_id) == []


# -- MLflow-native mode ----------------------------------------------------------------------

def test_mlflow_native_mode_records_the_same_run(app: App) -> None:
    """The same app under mode=otlp (ours) and mode=mlflow (MLflow's autolog):
    both give one trace with the prompt, the answer, the tool call and the
    same token usage; ours also shows the model calls as a conversation."""
    app.write(AGENT_APP)
    metadata = {"TRACED_RUN_SESSION_ID": "batch-9", "TRACED_RUN_USER_ID": "carol",
                "TRACED_RUN_TAGS": "environment=prod", "TRACED_RUN_TRACE_NAME": "weather"}
    ours = app.run("python", "app.py", env=app.env(**metadata))
    assert ours.returncode == 0, ours.stderr.decode()
    (otlp_trace,) = app.traces(1)
    native_app = App(app.directory, app.server, app.experiment + "-native")
    native = native_app.run("python", "app.py", env=native_app.env(TRACED_RUN_MODE="mlflow", **metadata))
    assert native.returncode == 0, native.stderr.decode()
    assert native.stdout == ours.stdout
    (native_trace,) = native_app.traces(1)

    for trace in (otlp_trace, native_trace):
        assert "What is the weather in Paris?" in trace.info.request_preview
        assert "a: sunny" in trace.info.response_preview
        assert trace.info.token_usage["total_tokens"] == otlp_trace.info.token_usage["total_tokens"]
        kinds = spans_by_type(trace)
        assert len(kinds["LLM"]) == 2
        (tool,) = kinds["TOOL"]
        assert (tool.inputs, tool.outputs) == ({"city": "a"}, "a: sunny")
    for each_app in (app, native_app):
        found = search(each_app, "metadata.`mlflow.trace.session` = 'batch-9' AND "
                       "metadata.`mlflow.trace.user` = 'carol' AND tags.environment = 'prod' AND "
                       "trace.name = 'weather'")
        assert len(found) == 1, each_app.experiment
    # Ours: the agent span's input is the prompt itself, and the model call reads as chat messages.
    (agent,) = spans_by_type(otlp_trace)["AGENT"]
    assert agent.inputs == "What is the weather in Paris?"
    last = max(spans_by_type(otlp_trace)["LLM"], key=lambda s: s.start_time_ns)
    assert [m["role"] for m in last.inputs] == ["system", "user", "assistant", "tool"]


def test_mlflow_native_mode_without_mlflow_says_so(app: App) -> None:
    app.write(AGENT_APP)
    # An app environment without the mlflow package: a module that fails as a missing one does.
    app.write("raise ImportError(\"No module named 'mlflow'\")\n", name="mlflow.py")
    done = app.run("python", "app.py", env=app.env(TRACED_RUN_MODE="mlflow"))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b'{"lookup":"a: sunny"}\n'
    (line,) = done.stderr.decode().splitlines()
    assert line.startswith("traced-run: mode=mlflow needs the mlflow package") and "untraced" in line
    strict = app.run("python", "app.py", env=app.env(TRACED_RUN_MODE="mlflow", TRACED_RUN_STRICT="true"))
    assert strict.returncode == 70 and strict.stdout == b""
    (line,) = strict.stderr.decode().splitlines()
    assert "mode=mlflow needs the mlflow package" in line and "strict mode" in line
