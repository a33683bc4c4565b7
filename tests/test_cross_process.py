"""One trace across processes (issue 27): a script whose agent's tool calls a service over
httpx, and the service (FastAPI under uvicorn) running an agent of its own, both under
traced-run and writing to the same experiment, give ONE trace; the service called by anyone
else gives a complete trace of its own. Real processes, the real MLflow."""

from __future__ import annotations

import http.server
import json
import re
import secrets
import subprocess
import threading
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import App, QuietHandler, free_port, poll, serving, traced_env
from support.openai_standin import OpenAIStandin

SERVICE = """
    from fastapi import FastAPI
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    forecaster = Agent(TestModel(custom_output_text="sunny all week"), name="forecaster")
    api = FastAPI()


    @api.get("/forecast")
    async def forecast(city: str) -> dict[str, str]:
        result = await forecaster.run(f"Forecast for {city}?")
        return {"answer": result.output}
"""

CLIENT = """
    import os
    import sys

    import httpx2
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    assistant = Agent(TestModel(), name="assistant")


    @assistant.tool_plain
    def ask_forecaster(city: str) -> str:
        \"\"\"Ask the forecast service.\"\"\"
        return httpx2.get(f"{os.environ['SERVICE_URL']}/forecast", params={"city": city}).json()["answer"]


    httpx2.get(f"{os.environ['SERVICE_URL']}/health")  # outside any run
    print(assistant.run_sync("What is the weather in Paris?").output)
"""
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-0[13]")


@pytest.fixture
def service(app: App, which: Callable[[str], str]) -> Iterator[str]:
    """Service B under traced-run (uvicorn, FastAPI, an agent in its endpoint); yields its URL."""
    app.write(SERVICE, "service.py")
    port = free_port()
    command = [which("uvicorn"), "--host", "127.0.0.1", "--port", str(port), "service:api"]
    with serving(app, command, port, traced_env(app)):
        yield f"http://127.0.0.1:{port}"


def _parent_of(trace: Any, span: Any) -> Any:
    (parent,) = [s for s in trace.data.spans if s.span_id == span.parent_id]
    return parent


def _one_trace(app: App, done: subprocess.CompletedProcess[bytes], tool: str) -> Any:
    """The client ran, and its question is one trace in MLflow, OK, rooted at the client's agent,
    with the service's agent right under the client's ``tool`` span."""
    assert done.returncode == 0, done.stderr.decode()
    assert b"sunny all week" in done.stdout

    def whole() -> Any:
        # The two processes post on their own: the client's part may be stored first.
        (trace,) = app.traces(1)
        return trace if any(s.name == "invoke_agent forecaster" for s in trace.data.spans) else None

    trace = poll(whole, timeout=60, what="the service's agent in the client's trace")
    assert str(trace.info.state).endswith("OK")
    (root,) = [s for s in trace.data.spans if s.parent_id is None]
    assert root.name == "invoke_agent assistant"
    (served,) = [s for s in trace.data.spans if s.name == "invoke_agent forecaster"]
    assert _parent_of(trace, served).name == tool
    return trace


def test_a_client_agent_calling_a_service_agent_is_one_trace(app: App, service: str) -> None:
    app.write(CLIENT, "client.py")
    done = app.run("python", "client.py", env=traced_env(app, SERVICE_URL=service))
    trace = _one_trace(app, done, "execute_tool ask_forecaster")
    (tool,) = [s for s in trace.data.spans if s.name == "execute_tool ask_forecaster"]
    assert _parent_of(trace, tool).name == "invoke_agent assistant"
    assert trace.info.tags.get("mlflow.traceName") == "assistant"


def test_the_service_called_with_a_traceparent_of_its_own_is_a_complete_trace(app: App, service: str) -> None:
    callers_trace = secrets.token_hex(16)
    call = urllib.request.Request(f"{service}/forecast?city=Oslo",
                                  headers={"traceparent": f"00-{callers_trace}-{secrets.token_hex(8)}-01"})
    with urllib.request.urlopen(call, timeout=60) as answer:
        assert b"sunny all week" in answer.read()
    (trace,) = app.traces(1)
    assert str(trace.info.state).endswith("OK")
    (root,) = [s for s in trace.data.spans if s.parent_id is None]
    assert root.name == "invoke_agent forecaster"
    assert callers_trace not in trace.info.trace_id


class _Recorder(QuietHandler):
    seen: list[dict[str, str]]

    def do_GET(self) -> None:
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.answer(200, b'{"answer": "recorded"}', "application/json")


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """An untraced HTTP server that keeps the headers of each request it gets."""
    seen: list[dict[str, str]] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_only_requests_of_a_run_carry_its_trace_and_an_opaque_entry(
        app: App, recorder: tuple[str, list[dict[str, str]]]) -> None:
    url, seen = recorder
    app.write(CLIENT, "client.py")
    done = app.run("python", "client.py", env=traced_env(app, SERVICE_URL=url))
    assert done.returncode == 0, done.stderr.decode()
    outside, inside = seen
    assert "traceparent" not in outside and "tracestate" not in outside
    (trace,) = app.traces(1)
    match = TRACEPARENT.fullmatch(inside["traceparent"])
    assert match, inside["traceparent"]
    assert trace.info.trace_id == f"tr-{match[1]}"
    (tool,) = [s for s in trace.data.spans if s.name == "execute_tool ask_forecaster"]
    assert tool.span_id == match[2]
    # Nothing of the destination is readable: one entry, an opaque digest.
    assert re.fullmatch(r"traced-run=[0-9a-f]{16}", inside["tracestate"]), inside["tracestate"]


def test_switched_off_no_request_carries_the_trace(
        app: App, recorder: tuple[str, list[dict[str, str]]]) -> None:
    url, seen = recorder
    app.write(CLIENT, "client.py")
    done = app.run("python", "client.py",
                   env=traced_env(app, SERVICE_URL=url, TRACED_RUN_PROPAGATE_CONTEXT="false"))
    assert done.returncode == 0, done.stderr.decode()
    assert len(seen) == 2
    assert not any("traceparent" in headers or "tracestate" in headers for headers in seen)
    app.traces(1)


PROVIDER_CLIENT = """
    import os

    import httpx2
    from pydantic_ai import Agent

    assistant = Agent("openai-chat:gpt-4o", name="assistant")


    @assistant.tool_plain
    def ask_forecaster(city: str) -> str:
        \"\"\"Ask the forecast service.\"\"\"
        return httpx2.get(f"{os.environ['SERVICE_URL']}/forecast", params={"city": city}).json()["answer"]


    print(assistant.run_sync("What is the weather in Paris?").output)
"""


def test_the_model_providers_requests_carry_nothing(
        app: App, recorder: tuple[str, list[dict[str, str]]]) -> None:
    url, seen = recorder
    app.write(PROVIDER_CLIENT, "client.py")
    with OpenAIStandin() as provider:
        done = app.run("python", "client.py", env=traced_env(app, SERVICE_URL=url, **provider.env()))
        model_calls = provider.requests
    assert done.returncode == 0, done.stderr.decode()
    assert len(model_calls) == 2
    for call in model_calls:
        assert "traceparent" not in call.headers and "tracestate" not in call.headers, call.headers
    (tool_call,) = seen
    assert TRACEPARENT.fullmatch(tool_call["traceparent"])


HTTP_CLIENT = """
    import os

    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    INSTRUMENT = os.environ.get("INSTRUMENT")
    assistant = Agent(TestModel(), name="assistant")
{tool}

    print(assistant.run_sync("What is the weather in Paris?").output)
"""
HTTP_CLIENT_TOOLS = {
    "requests": """
    import requests

    if INSTRUMENT:
        from opentelemetry.instrumentation.requests import RequestsInstrumentor

        RequestsInstrumentor().instrument()


    @assistant.tool_plain
    def ask_forecaster(city: str) -> str:
        \"\"\"Ask the forecast service.\"\"\"
        answer = requests.get(f"{os.environ['SERVICE_URL']}/forecast", params={"city": city}, timeout=60)
        return answer.json()["answer"]
""",
    "aiohttp": """
    import aiohttp

    if INSTRUMENT:
        from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor

        AioHttpClientInstrumentor().instrument()


    @assistant.tool_plain
    async def ask_forecaster(city: str) -> str:
        \"\"\"Ask the forecast service.\"\"\"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{os.environ['SERVICE_URL']}/forecast", params={"city": city}) as answer:
                return (await answer.json())["answer"]
""",
}
"""A tool's HTTP call with a client traced-run leaves alone, as users have them."""


@pytest.mark.parametrize("client", HTTP_CLIENT_TOOLS)
def test_a_plain_http_client_carries_nothing(app: App, recorder: tuple[str, list[dict[str, str]]],
                                             client: str) -> None:
    url, seen = recorder
    app.write(HTTP_CLIENT.format(tool=HTTP_CLIENT_TOOLS[client]), "client.py")
    done = app.run("python", "client.py", env=traced_env(app, SERVICE_URL=url))
    assert done.returncode == 0, done.stderr.decode()
    (headers,) = seen
    assert "traceparent" not in headers and "tracestate" not in headers, headers
    app.traces(1)


@pytest.mark.parametrize("client", HTTP_CLIENT_TOOLS)
def test_an_http_client_the_app_instruments_joins_the_callees_trace(app: App, service: str,
                                                                    client: str) -> None:
    """The client's OpenTelemetry instrumentation injects with the global propagator, which
    traced-run wraps, so the request carries the run's trace and the entry. Its client span is the
    app's (here the app set no tracer provider: a non-recording span that passes the tool's context
    on), so the service's agent nests under the tool span, as with httpx."""
    app.write(HTTP_CLIENT.format(tool=HTTP_CLIENT_TOOLS[client]), "client.py")
    done = app.run("python", "client.py", env=traced_env(app, SERVICE_URL=service, INSTRUMENT="1"))
    trace = _one_trace(app, done, "execute_tool ask_forecaster")
    assert not [s for s in trace.data.spans if s.name == "GET"], "traced-run adds no span per request"


INSTRUMENTED_SERVICE = SERVICE + """

    from opentelemetry import trace
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    mine = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(mine))
    trace.set_tracer_provider(provider)
    FastAPIInstrumentor.instrument_app(api, excluded_urls="/mine")


    @api.get("/mine")
    async def what_my_exporter_got() -> list[list[str]]:
        return [[s.name, format(s.context.trace_id, "032x"),
                 format(s.parent.span_id, "016x") if s.parent else ""] for s in mine.get_finished_spans()]
"""


def test_a_service_with_its_own_http_instrumentation_joins_once_and_keeps_its_own_trace(
        app: App, which: Callable[[str], str]) -> None:
    app.write(INSTRUMENTED_SERVICE, "service.py")
    app.write(CLIENT, "client.py")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    callers_trace, callers_span = secrets.token_hex(16), secrets.token_hex(8)
    with serving(app, [which("uvicorn"), "--host", "127.0.0.1", "--port", str(port), "service:api"], port,
                 traced_env(app)):
        done = app.run("python", "client.py", env=traced_env(app, SERVICE_URL=url))
        assert done.returncode == 0, done.stderr.decode()
        call = urllib.request.Request(f"{url}/forecast?city=Oslo",
                                      headers={"traceparent": f"00-{callers_trace}-{callers_span}-01"})
        with urllib.request.urlopen(call, timeout=60) as answer:
            assert b"sunny all week" in answer.read()
        with urllib.request.urlopen(f"{url}/mine", timeout=60) as answer:
            its_own = json.loads(answer.read())
    joined, alone = sorted(app.traces(2), key=lambda t: len(t.data.spans), reverse=True)
    names = [s.name for s in joined.data.spans]
    assert names.count("GET /forecast") == names.count("invoke_agent forecaster") == 1, names
    (root,) = [s for s in joined.data.spans if s.parent_id is None]
    assert root.name == "invoke_agent assistant"
    (served,) = [s for s in joined.data.spans if s.name == "GET /forecast"]
    assert _parent_of(joined, served).name == "execute_tool ask_forecaster"
    (agent,) = [s for s in joined.data.spans if s.name == "invoke_agent forecaster"]
    assert _parent_of(joined, agent).span_id == served.span_id
    assert str(alone.info.state).endswith("OK")
    (alone_root,) = [s for s in alone.data.spans if s.parent_id is None]
    assert alone_root.name == "GET /forecast"
    # The app's own exporter got its spans as they were: the curl caller's trace and parent.
    assert ["GET /forecast", callers_trace, callers_span] in its_own, its_own
    assert joined.info.trace_id.removeprefix("tr-") in {trace_id for _, trace_id, _ in its_own}


FLASK_SERVICE = """
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel
    from flask import Flask, request

    forecaster = Agent(TestModel(custom_output_text="sunny all week"), name="forecaster")
    api = Flask(__name__)


    @api.get("/forecast")
    def forecast() -> dict[str, str]:
        return {"answer": forecaster.run_sync(f"Forecast for {request.args['city']}?").output}
"""


def test_a_flask_service_under_gunicorn_joins_the_callers_trace(
        app: App, which: Callable[[str], str]) -> None:
    app.write(FLASK_SERVICE, "service.py")
    app.write(CLIENT, "client.py")
    port = free_port()
    command = [which("gunicorn"), "--bind", f"127.0.0.1:{port}", "--workers", "1", "service:api"]
    with serving(app, command, port, traced_env(app)):
        done = app.run("python", "client.py", env=traced_env(app, SERVICE_URL=f"http://127.0.0.1:{port}"))
    _one_trace(app, done, "execute_tool ask_forecaster")


MCP_SERVER = """
    from fastmcp import FastMCP
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    forecaster = Agent(TestModel(custom_output_text="sunny all week"), name="forecaster")
    server = FastMCP("forecasts")


    @server.tool
    async def forecast(city: str) -> str:
        \"\"\"The forecast for a city.\"\"\"
        return (await forecaster.run(f"Forecast for {city}?")).output


    if __name__ == "__main__":
        import os

        if "PORT" in os.environ:
            server.run(transport="http", host="127.0.0.1", port=int(os.environ["PORT"]), show_banner=False)
        else:
            server.run(show_banner=False)
"""

MCP_CLIENT = """
    import os

    from fastmcp import Client
    from fastmcp.client.transports import PythonStdioTransport, StdioTransport
    from pydantic_ai import Agent
    from pydantic_ai.mcp import MCPToolset
    from pydantic_ai.models.test import TestModel

    if "MCP_URL" in os.environ:
        forecasts = MCPToolset(os.environ["MCP_URL"])
    elif "ONLY_THE_DESTINATION" in os.environ:
        # The server under traced-run as its command, given only what it needs.
        passed = ("PATH", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TRACED_RUN_SPOOL_DIR",
                  "TRACED_RUN_EXIT_TIMEOUT")
        forecasts = MCPToolset(Client(StdioTransport(command="traced-run", args=["python", "server.py"],
                                                     env={name: os.environ[name] for name in passed})))
    else:
        # The MCP SDK gives a stdio server only a few safe variables unless told otherwise.
        forecasts = MCPToolset(Client(PythonStdioTransport("server.py", env=dict(os.environ))))
    assistant = Agent(TestModel(), name="assistant", toolsets=[forecasts])
    print(assistant.run_sync("What is the weather in Paris?").output)
"""


@pytest.mark.parametrize("how", ["the client's environment", "traced-run as the command"])
def test_an_mcp_stdio_servers_agent_nests_under_the_clients_tool_call(app: App, how: str) -> None:
    app.write(MCP_SERVER, "server.py")
    app.write(MCP_CLIENT, "client.py")
    extra = {"ONLY_THE_DESTINATION": "1"} if how == "traced-run as the command" else {}
    done = app.run("python", "client.py", env=traced_env(app, **extra))
    _one_trace(app, done, "execute_tool forecast")


def test_a_streamable_http_mcp_servers_agent_nests_under_the_clients_tool_call(app: App) -> None:
    app.write(MCP_SERVER, "server.py")
    app.write(MCP_CLIENT, "client.py")
    port = free_port()
    with serving(app, ["python", "server.py"], port, traced_env(app, PORT=str(port))):
        done = app.run("python", "client.py", env=traced_env(app, MCP_URL=f"http://127.0.0.1:{port}/mcp"))
    _one_trace(app, done, "execute_tool forecast")
