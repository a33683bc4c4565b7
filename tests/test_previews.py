"""The Request and Response MLflow's trace list shows for a traced run: a prompt's
attachments named, never their bytes; several agents under one span of the app's
(a route, a graph) as one trace that reads as the whole: what came in first,
what went out last, the app's name for it."""

from __future__ import annotations

import base64

from conftest import App, traced_env

PNG = b"\x89PNG\r\n\x1a\n" + bytes(270440)
"""270448 bytes that start as a PNG does (the issue's image size)."""
IMAGE_URL = "https://example.com/otter.png"

IMAGE_APP = """
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from pydantic_ai import Agent, BinaryContent, ImageUrl
    from pydantic_ai.messages import ModelResponse, TextPart
    from pydantic_ai.models.function import FunctionModel

    trace.set_tracer_provider(TracerProvider())
    looker = Agent(FunctionModel(lambda messages, info: ModelResponse(parts=[TextPart("An otter.")])),
                   name="looker")
    image = BinaryContent(data=b"\\x89PNG\\r\\n\\x1a\\n" + bytes(270440), media_type="image/png")
    prompt = ["What is in the picture?", image, ImageUrl(url="IMAGE_URL")]
    looker.run_sync(prompt)
    with trace.get_tracer("app").start_as_current_span("POST /look"):
        looker.run_sync(prompt)
""".replace("IMAGE_URL", IMAGE_URL)


def test_an_image_prompt_is_named_by_kind_and_size_in_the_request_never_by_its_bytes(app: App) -> None:
    app.write(IMAGE_APP)
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    traces = app.traces(2)
    roots = sorted(next(s.name for s in t.data.spans if s.parent_id is None) for t in traces)
    assert roots == ["POST /look", "invoke_agent looker"], "the agent as root, and an app span as root"
    encoded = base64.b64encode(PNG).decode()
    for trace in traces:
        request = str(trace.info.request_preview)
        assert "What is in the picture?" in request, request
        assert "[image/png, 270448 bytes]" in request, request
        assert f"[image/png: {IMAGE_URL}]" in request, request
        assert encoded[:12] not in request and "AAAAAAAA" not in request, request[:200]
        assert "An otter." in str(trace.info.response_preview)


def two_agents(around: str) -> str:
    """An app whose ``around`` block runs agent ``writer`` then agent ``critic`` on the
    writer's draft; the critic's tool asks a third agent, which is the critic's business."""
    return """
    import asyncio

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel
    from pydantic_ai.models.test import TestModel


    def answer(text: str) -> FunctionModel:
        return FunctionModel(lambda messages, info: ModelResponse(parts=[TextPart(text)]))


    def criticise(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if any(isinstance(part, ToolReturnPart) for part in messages[-1].parts):
            return ModelResponse(parts=[TextPart("VERDICT: needs more otters")])
        return ModelResponse(parts=[ToolCallPart("second_opinion", {"draft": "the draft"})])


    writer = Agent(answer("DRAFT: otters hold hands"), name="writer")
    critic = Agent(FunctionModel(criticise), name="critic")
    adviser = Agent(TestModel(custom_output_text="ADVICE: fine"), name="adviser")


    @critic.tool_plain
    async def second_opinion(draft: str) -> str:
        \"\"\"Another view.\"\"\"
        return (await adviser.run(f"Opinion on {draft}")).output

    """ + around


AROUND_A_SPAN = """
    trace.set_tracer_provider(TracerProvider())
    tracer = trace.get_tracer("my.app")


    async def review() -> None:
        with tracer.start_as_current_span("POST /review"):
            draft = (await writer.run("Write about otters.")).output
            print((await critic.run(f"Critique: {draft}")).output)


    asyncio.run(review())
"""

AROUND_A_GRAPH = """
    import logfire
    from pydantic_graph import GraphBuilder, StepContext

    logfire.configure(send_to_logfire=False, console=False)
    logfire.instrument_pydantic_ai()
    builder = GraphBuilder(name="review", input_type=str, output_type=str)


    @builder.step
    async def write(ctx: StepContext[None, None, str]) -> str:
        return (await writer.run(ctx.inputs)).output


    @builder.step
    async def criticise(ctx: StepContext[None, None, str]) -> str:
        return (await critic.run(f"Critique: {ctx.inputs}")).output


    builder.add(builder.edge_from(builder.start_node).to(write), builder.edge_from(write).to(criticise),
                builder.edge_from(criticise).to(builder.end_node))
    print(asyncio.run(builder.build().run(inputs="Write about otters.")))
"""


def assert_one_trace_for_the_whole(app: App, source: str, root: str) -> None:
    app.write(source)
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    assert b"VERDICT" in done.stdout
    (trace,) = app.traces(1)
    (top,) = [s for s in trace.data.spans if s.parent_id is None]
    assert top.name == root
    agents = sorted(s.name for s in trace.data.spans if s.name.startswith("invoke_agent"))
    assert agents == ["invoke_agent adviser", "invoke_agent critic", "invoke_agent writer"]
    assert trace.info.request_preview == '"Write about otters."', "what came in first"
    assert trace.info.response_preview == '"VERDICT: needs more otters"', "what went out last"
    assert trace.info.tags.get("mlflow.traceName") == root, "the app's name for it, not the first agent's"


def test_two_agents_in_a_span_of_the_app_are_one_trace_from_the_first_prompt_to_the_last_output(
        app: App) -> None:
    assert_one_trace_for_the_whole(app, two_agents(AROUND_A_SPAN), "POST /review")


def test_a_graph_of_two_agents_is_one_trace_named_after_the_graph_with_its_result(app: App) -> None:
    assert_one_trace_for_the_whole(app, two_agents(AROUND_A_GRAPH), "run graph review")
