"""The OpenAI stand-in (tests/support/openai_standin.py) answers what the real API would,
closely enough that the real openai SDK, pydantic-ai's OpenAI models and
pydantic-ai's published example apps (run unmodified) work against it."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import clean_env, free_port, poll
from openai.types import chat, responses
from pydantic import BaseModel, Field, TypeAdapter
from pydantic_ai import Agent, NativeOutput
from support.openai_standin import OpenAIStandin, example_from_schema

MODELS = ["openai:gpt-5.2", "openai-chat:gpt-5.2"]
RESPONSES = "/v1/responses"
CHAT = "/v1/chat/completions"
PATH = {"openai": RESPONSES, "openai-chat": CHAT}
STREAM_EVENT: TypeAdapter[Any] = TypeAdapter(responses.ResponseStreamEvent)
WEATHER_TOOL = {"type": "function", "name": "weather", "strict": True, "description": "Weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"], "additionalProperties": False}}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIStandin]:
    """The stand-in, with this process's openai clients pointed at it."""
    with OpenAIStandin() as standin:
        for key, value in standin.env().items():
            monkeypatch.setenv(key, value)
        yield standin


@dataclass
class Answer:
    status: int
    content_type: str
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def http(url: str, body: dict[str, Any] | None = None, *, form: dict[str, str] | None = None) -> Answer:
    """GET ``url``, or POST ``body`` as JSON / ``form`` as a form, and read the whole answer."""
    data = None
    headers = {}
    if body is not None:
        data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
    elif form is not None:
        data = urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as answer:
        return Answer(answer.status, answer.headers.get("Content-Type", ""), answer.read().decode())


def sse_data(raw: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event in ``raw``."""
    events = []
    for block in raw.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields.get("event"), fields["data"]))
    return events


def strict_usage_check(usage: dict[str, int], into: str, out: str) -> None:
    assert usage[into] > 0 and usage[out] > 0
    assert usage["total_tokens"] == usage[into] + usage[out]


# --- the wire format, checked against the installed openai package's own types -----------------


@pytest.mark.parametrize("tools", [[], [WEATHER_TOOL]], ids=["text", "tool"])
def test_responses_answer_validates_as_openai_response(api: OpenAIStandin, tools: list[Any]) -> None:
    raw = http(f"{api.base_url}/responses", {"model": "gpt-5.2", "input": "hi", "tools": tools})
    assert raw.status == 200
    response = responses.Response.model_validate(raw.json())
    assert response.status == "completed"
    assert response.usage is not None
    strict_usage_check(raw.json()["usage"], "input_tokens", "output_tokens")
    if tools:
        [call] = response.output
        assert isinstance(call, responses.ResponseFunctionToolCall)
        assert (call.name, json.loads(call.arguments)) == ("weather", {"city": "a"})
    else:
        assert response.output_text == api.text


@pytest.mark.parametrize("tools", [[], [WEATHER_TOOL]], ids=["text", "tool"])
def test_responses_stream_is_the_real_event_sequence(api: OpenAIStandin, tools: list[Any]) -> None:
    raw = http(f"{api.base_url}/responses",
               {"model": "gpt-5.2", "input": "hi", "tools": tools, "stream": True})
    assert raw.content_type.startswith("text/event-stream")
    events = [(name, STREAM_EVENT.validate_json(data)) for name, data in sse_data(raw.text)]
    assert all(name == event.type for name, event in events)
    assert [event.sequence_number for _, event in events] == list(range(len(events)))
    kinds = [event.type for _, event in events]
    body = (["response.output_item.added", "response.function_call_arguments.delta",
             "response.function_call_arguments.delta", "response.function_call_arguments.done",
             "response.output_item.done"] if tools else
            ["response.output_item.added", "response.content_part.added"]
            + ["response.output_text.delta"] * (len(api.text.split()) // 2 + len(api.text.split()) % 2)
            + ["response.output_text.done", "response.content_part.done", "response.output_item.done"])
    assert kinds == ["response.created", "response.in_progress", *body, "response.completed"]
    completed = events[-1][1]
    assert completed.response.usage.total_tokens == (completed.response.usage.input_tokens
                                                     + completed.response.usage.output_tokens)
    if not tools:
        deltas = "".join(e.delta for _, e in events if e.type == "response.output_text.delta")
        assert deltas == api.text == completed.response.output_text


def test_chat_answer_and_stream_validate_as_openai_chat_types(api: OpenAIStandin) -> None:
    tools = [{"type": "function", "function": {k: WEATHER_TOOL[k] for k in ("name", "parameters")}}]
    request = {"model": "gpt-5.2", "messages": [{"role": "user", "content": "hi"}], "tools": tools}
    whole = http(f"{api.base_url}/chat/completions", request).json()
    completion = chat.ChatCompletion.model_validate(whole)
    assert completion.choices[0].finish_reason == "tool_calls"
    strict_usage_check(whole["usage"], "prompt_tokens", "completion_tokens")

    raw = http(f"{api.base_url}/chat/completions",
               {**request, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_data(raw.text)
    assert events[-1] == (None, "[DONE]")
    chunks = [chat.ChatCompletionChunk.model_validate_json(data) for _, data in events[:-1]]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    arguments = "".join(call.function.arguments or "" for c in chunks if c.choices
                        for call in c.choices[0].delta.tool_calls or [] if call.function)
    assert json.loads(arguments) == {"city": "a"}


def test_sdk_streams_and_records_every_request(api: OpenAIStandin) -> None:
    client = openai.OpenAI()
    with client.responses.stream(model="gpt-5.2", input="hi") as stream:
        final = stream.get_final_response()
    assert final.output_text == api.text
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="gpt-5.2", messages=[{"role": "user", "content": "hi"}], stream=True) if c.choices)
    assert text == api.text
    first, second = api.requests
    assert (first.method, first.path, first.body["stream"]) == ("POST", RESPONSES, True)
    assert second.path == CHAT and second.body["messages"] == [{"role": "user", "content": "hi"}]
    assert first.headers["authorization"] == "Bearer test"
    assert api.errors == []


def test_unknown_path_is_a_404_in_the_api_error_shape(api: OpenAIStandin) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        openai.OpenAI(max_retries=0).embeddings.create(model="x", input="hi")
    assert caught.value.code == "unknown_url"


def test_quiet_and_stops_cleanly(capfd: pytest.CaptureFixture[str]) -> None:
    with OpenAIStandin() as standin:
        client = openai.OpenAI(base_url=standin.base_url, api_key="test", max_retries=0)
        client.responses.create(model="gpt-5.2", input="hi")  # leaves a kept-alive connection open
        with pytest.raises(openai.NotFoundError):
            client.models.list()
        port = standin.port
    assert capfd.readouterr() == ("", "")
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


# --- pydantic-ai's real OpenAI models ----------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_agent_run_sync_and_run_stream(api: OpenAIStandin, model: str) -> None:
    agent = Agent(model)
    result = agent.run_sync("hello")
    assert result.output == api.text
    usage = result.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0 and usage.requests == 1

    async def streamed() -> list[str]:
        async with agent.run_stream("hello") as run:
            return [text async for text in run.stream_text(delta=True, debounce_by=None)]

    pieces = asyncio.run(streamed())
    assert len(pieces) > 1 and "".join(pieces) == api.text
    assert [body["stream"] for body in api.bodies(PATH[model.split(":")[0]])] == [False, True]


@pytest.mark.parametrize("model", MODELS)
def test_agent_tool_run(api: OpenAIStandin, model: str) -> None:
    agent = Agent(model)
    seen: list[tuple[str, int, bool]] = []

    @agent.tool_plain
    def lookup(city: str, days: int, metric: bool) -> str:
        seen.append((city, days, metric))
        return f"sunny in {city}"

    assert agent.run_sync("weather?").output == api.text
    assert seen == [("a", 1, False)]
    first, second = api.bodies(PATH[model.split(":")[0]])
    assert "sunny in a" in json.dumps(second)
    assert "sunny in a" not in json.dumps(first)


@pytest.mark.parametrize("model", MODELS)
def test_parallel_tool_calls_in_one_answer(api: OpenAIStandin, model: str) -> None:
    api.parallel_tool_calls = 3
    agent = Agent(model)
    seen: list[str] = []

    @agent.tool_plain
    def lookup(city: str) -> str:
        seen.append(city)
        return city

    @agent.tool_plain
    def other(n: int) -> int:
        seen.append(str(n))
        return n

    agent.run_sync("go")
    assert sorted(seen) == ["1", "a", "a1"]
    assert len(api.bodies(PATH[model.split(":")[0]])) == 2


class Colour(str, Enum):
    red = "red"
    blue = "blue"


class Place(BaseModel):
    city: str
    country: str = Field(min_length=3)
    population: int = Field(ge=10)
    founded: datetime
    colour: Colour
    tags: list[str]
    twin: Place | None


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("native", [False, True], ids=["output-tool", "json-schema"])
def test_structured_output(api: OpenAIStandin, model: str, native: bool) -> None:
    agent = Agent(model, output_type=NativeOutput(Place) if native else Place)
    calls: list[int] = []

    @agent.tool_plain
    def count() -> int:
        calls.append(1)
        return 7

    place = agent.run_sync("where?").output
    assert isinstance(place, Place)
    assert (place.city, place.colour, place.tags, place.population, len(place.country)) == (
        "a", Colour.red, ["a"], 10, 3)
    assert calls == [1]
    _, last = api.bodies(PATH[model.split(":")[0]])
    assert ('"json_schema"' in json.dumps(last)) == native


def test_example_values_follow_the_schema() -> None:
    schema = Place.model_json_schema()
    first, second = (Place.model_validate(example_from_schema(schema, variant)) for variant in (0, 1))
    assert first != second


# --- pydantic-ai's published example apps, unmodified -----------------------------------------


def run_example(api: OpenAIStandin, module: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module], env=clean_env(**api.env(), **extra),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("model", MODELS)
def test_example_pydantic_model(api: OpenAIStandin, model: str) -> None:
    done = run_example(api, "pydantic_ai_examples.pydantic_model", PYDANTIC_AI_MODEL=model)
    assert done.returncode == 0, done.stderr
    assert "city='a' country='a'" in done.stdout
    [body] = api.bodies(PATH[model.split(":")[0]])
    assert "windy city" in json.dumps(body)


def test_example_bank_support(api: OpenAIStandin) -> None:
    done = run_example(api, "pydantic_ai_examples.bank_support")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("support_advice='a' block_card=False risk=1") == 2
    bodies = api.bodies(RESPONSES)
    assert len(bodies) == 4  # per question: the balance tool call, then the output tool call
    assert "$123.45" in json.dumps(bodies[1]) and "John" in json.dumps(bodies[0])


@pytest.fixture
def chat_app(api: OpenAIStandin, tmp_path: Path) -> Iterator[str]:
    """pydantic_ai_examples.chat_app under uvicorn; it keeps its history in a sqlite
    file next to its module, removed afterwards when this test made it."""
    module = importlib.util.find_spec("pydantic_ai_examples.chat_app")
    assert module is not None and module.origin is not None
    history = Path(module.origin).parent / ".chat_app_messages.sqlite"
    had_history = history.exists()
    port = free_port()
    log = (tmp_path / "uvicorn.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "pydantic_ai_examples.chat_app:app", "--host", "127.0.0.1",
         "--port", str(port)], env=clean_env(**api.env()), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return http(f"{url}/chat/").status == 200
        except urllib.error.URLError:
            assert server.poll() is None, (tmp_path / "uvicorn.log").read_text()
            return False

    try:
        poll(up, timeout=60, what="chat_app to answer")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
        if not had_history:
            history.unlink(missing_ok=True)


def test_example_chat_app_streams(api: OpenAIStandin, chat_app: str) -> None:
    before = len(http(f"{chat_app}/chat/").text.splitlines())
    answer = http(f"{chat_app}/chat/", form={"prompt": "tell me"})
    assert answer.status == 200
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert lines[0]["role"] == "user" and lines[0]["content"] == "tell me"
    assert lines[-1] == {**lines[-1], "role": "model", "content": api.text}
    [body] = api.bodies(RESPONSES)
    assert body["stream"] is True
    history = [json.loads(line) for line in http(f"{chat_app}/chat/").text.splitlines()]
    assert len(history) == before + 2 and history[-1]["content"] == api.text
