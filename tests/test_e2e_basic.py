"""The main job: an unchanged pydantic-ai app under traced-run gives one trace
per agent run in MLflow, with AGENT, LLM and TOOL spans nested as they ran."""

from __future__ import annotations

from conftest import AGENT_APP, App, spans_by_type


def test_tool_calling_run_arrives_as_one_nested_trace(app: App) -> None:
    app.write(AGENT_APP)
    done = app.run("python", "app.py")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b'{"lookup":"a: sunny"}\n'
    assert done.stderr == b""

    (trace,) = app.traces(1)
    kinds = spans_by_type(trace)
    (agent,) = kinds["AGENT"]
    assert agent.parent_id is None
    assert agent.inputs == "What is the weather in Paris?"
    assert agent.outputs == {"lookup": "a: sunny"}
    assert len(kinds["LLM"]) == 2
    (tool,) = kinds["TOOL"]
    assert tool.name == "execute_tool lookup"
    assert tool.inputs == {"city": "a"}
    assert tool.outputs == "a: sunny"
    assert {s.parent_id for s in kinds["LLM"] + kinds["TOOL"]} == {agent.span_id}
    assert trace.info.request_preview == '"What is the weather in Paris?"'
    assert trace.info.token_usage["input_tokens"] > 0
    assert trace.info.tags["service.name"] == "app"


def test_mlflows_search_by_span_type_finds_the_run(app: App) -> None:
    """MLflow's ingest fills a span's searchable type only from ``mlflow.spanType``."""
    import mlflow

    app.write(AGENT_APP)
    done = app.run("python", "app.py")
    assert done.returncode == 0, done.stderr.decode()
    (trace,) = app.traces(1)
    mlflow.set_tracking_uri(app.server.url)
    experiment_id = app.server.experiment_id(app.experiment)
    for kind in ("AGENT", "LLM", "TOOL"):
        found = mlflow.search_traces(locations=[experiment_id], filter_string=f"span.type = '{kind}'",
                                     return_type="list")
        assert [t.info.trace_id for t in found] == [trace.info.trace_id], kind
    assert not mlflow.search_traces(locations=[experiment_id], filter_string="span.type = 'RETRIEVER'",
                                    return_type="list")
