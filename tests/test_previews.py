"""The Request and Response MLflow's trace list shows for a traced run: a prompt's
attachments named, never their bytes."""

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

