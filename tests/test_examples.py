"""The apps pydantic-ai publishes (``pydantic_ai_examples``), run unmodified
under traced-run through the real ``openai`` SDK, their model calls answered by
a loopback stand-in for the OpenAI API: most of them configure logfire and call
``logfire.instrument_pydantic_ai()``, as real apps do. Each agent run is one
trace in the real MLflow; a request that runs no agent is none."""

from __future__ import annotations

import importlib.util
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import App, free_port, request, serving, spans_by_type, traced_env
from support.openai_standin import OpenAIStandin


@pytest.fixture
def api() -> Iterator[OpenAIStandin]:
    with OpenAIStandin() as standin:
        yield standin


def run_example(app: App, api: OpenAIStandin, module: str) -> subprocess.CompletedProcess[bytes]:
    done = app.run("python", "-m", module, env=traced_env(app, **api.env()))
    assert done.returncode == 0, done.stderr.decode()
    assert b"traced-run:" not in done.stderr, done.stderr.decode()
    return done


def test_pydantic_model_with_logfire_is_one_trace(app: App, api: OpenAIStandin) -> None:
    done = run_example(app, api, "pydantic_ai_examples.pydantic_model")
    assert b"city='a' country='a'" in done.stdout
    (trace,) = app.traces(1)
    kinds = spans_by_type(trace)
    assert len(kinds["AGENT"]) == 1 and len(kinds["LLM"]) == 1, sorted(s.name for s in trace.data.spans)
    assert "windy city" in str(trace.info.request_preview)
    assert "gpt-5.2" in str([s.attributes.get("gen_ai.request.model") for s in kinds["LLM"]])


def test_bank_support_is_one_trace_per_question_with_its_tool(app: App, api: OpenAIStandin) -> None:
    run_example(app, api, "pydantic_ai_examples.bank_support")
    traces = app.traces(2)
    for trace in traces:
        kinds = spans_by_type(trace)
        assert len(kinds["AGENT"]) == 1 and len(kinds["TOOL"]) >= 1, sorted(s.name for s in trace.data.spans)
        assert "customer_balance" in [s.name.split()[-1] for s in kinds["TOOL"]]
    assert sorted(str(t.info.request_preview) for t in traces) == ['"I just lost my card!"',
                                                                    '"What is my balance?"']


@pytest.fixture
def chat_history() -> Iterator[None]:
    """chat_app keeps its history in a sqlite file next to its module: removed
    afterwards when this test made it."""
    spec = importlib.util.find_spec("pydantic_ai_examples.chat_app")
    assert spec is not None and spec.origin is not None
    history = Path(spec.origin).parent / ".chat_app_messages.sqlite"
    had_history = history.exists()
    yield
    if not had_history:
        history.unlink(missing_ok=True)


@pytest.mark.usefixtures("chat_history")
def test_chat_app_with_logfire_fastapi_is_one_trace_per_chat_request(
        app: App, api: OpenAIStandin, which: Callable[[str], str]) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [which("uvicorn"), "pydantic_ai_examples.chat_app:app", "--host", "127.0.0.1",
               "--port", str(port)]
    with serving(app, command, port, traced_env(app, **api.env())) as log:
        request(f"{base}/")
        request(f"{base}/chat/")
        answer = request(f"{base}/chat/", "POST", urllib.parse.urlencode({"prompt": "tell me"}).encode())
        request(f"{base}/chat/")
    assert api.text in answer
    assert "traced-run:" not in log.read_text(), log.read_text()
    (trace,) = app.traces(1)
    (root,) = [s for s in trace.data.spans if s.parent_id is None]
    assert root.name.startswith("POST /chat"), sorted(s.name for s in trace.data.spans)
    kinds = spans_by_type(trace)
    assert len(kinds["AGENT"]) == 1 and len(kinds["LLM"]) == 1
    assert "tell me" in str(trace.info.request_preview)
    assert api.text[:40] in str(trace.info.response_preview)
