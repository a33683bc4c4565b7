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
