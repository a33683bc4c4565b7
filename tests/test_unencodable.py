"""A span that is hard to encode costs nothing else (issue 23): a model's tool arguments
thousands of levels deep, and an exception whose message holds a lone surrogate (a file
name as ``os.listdir`` decodes it), once lost their whole batch, other runs' traces
included. A real app under ``traced-run``, real MLflow."""

from __future__ import annotations

import json

from conftest import App, json_depth, traced_env

from traced_run.spans.enrich import MAX_NESTING, NESTING_CUT

BAD_RUNS_APP = """
    from typing import Any

    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel


    def nested(depth: int) -> str:
        return '{"data": ' + "[" * depth + "1" + "]" * depth + "}"


    CALLS = {"too deep": ("store", nested(3000)), "deep": ("store", nested(40)), "listing": ("listing", "{}")}


    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if any(isinstance(part, ToolReturnPart) for message in messages for part in message.parts):
            return ModelResponse(parts=[TextPart("done")])
        prompt = messages[0].parts[-1].content
        if prompt in CALLS:
            return ModelResponse(parts=[ToolCallPart(*CALLS[prompt])])
        return ModelResponse(parts=[TextPart(f"answer to {prompt}")])


    agent = Agent(FunctionModel(model), name="bad-spans")


    @agent.tool_plain
    def store(data: Any) -> str:
        return "stored"


    @agent.tool_plain
    def listing() -> str:
        raise OSError("cannot open r\\udcffsum\\udce9.txt")


    for prompt in ["too deep", "listing", "deep", *(f"run {n}" for n in range(8))]:
        try:
            print(agent.run_sync(prompt).output, flush=True)
        except Exception as error:
            print("the run failed:", type(error).__name__, flush=True)
"""


def test_deep_tool_arguments_and_a_lone_surrogate_cost_no_trace(app: App) -> None:
    app.write(BAD_RUNS_APP)
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    # Nothing lost nor dropped (the surrogate run fails in the app, as it would untraced). A slow
    # MLflow on a loaded machine may still be said, so only those words are looked for.
    said = done.stderr.decode(errors="replace")
    assert "lost" not in said and "dropped" not in said and "could not be encoded" not in said, said
    traces = app.traces(11, timeout=60)
    spans = [span for trace in traces for span in trace.data.spans]
    assert len({trace.info.request_preview for trace in traces}) == 11

    listing = next(span for span in spans if span.name == "execute_tool listing")
    messages = [event.attributes.get("exception.message") for event in listing.events]
    assert "cannot open r\\udcffsum\\udce9.txt" in messages

    # MLflow got every JSON value cut where a trace stays readable (see MAX_NESTING), the
    # arguments as the model sent them and as the tool got them (40 deep) alike.
    assert max(json_depth(value) for span in spans for value in (span.inputs, span.outputs)) <= MAX_NESTING
    cut = [span.name for span in spans if NESTING_CUT in json.dumps([span.inputs, span.outputs])]
    assert "execute_tool store" in cut and cut.count("chat function:model:") >= 2, cut
