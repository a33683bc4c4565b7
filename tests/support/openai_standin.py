"""A loopback stand-in for the OpenAI HTTP API, started in-process by tests, so
that apps run unmodified through the real ``openai`` SDK and pydantic-ai's real
OpenAI models (``openai:`` = Responses API, ``openai-chat:`` = Chat Completions)
with ``OPENAI_BASE_URL=<stand-in>/v1`` and ``OPENAI_API_KEY=test``.

Endpoints: ``POST /v1/responses`` and ``POST /v1/chat/completions``, each as a
whole JSON answer or, with ``"stream": true``, as server-sent events the way the
real API sends them (Responses: typed ``event:`` lines from ``response.created``
to ``response.completed``; Chat: ``chat.completion.chunk`` data lines, then
``data: [DONE]``). Anything else gets a 404 in the API's error shape.

What it answers is scripted like pydantic-ai's TestModel, from the request alone:

1. the request offers function tools and this turn (everything after the last
   user message) holds no tool result yet: call tools, all in one answer: each
   function tool once, or, with ``parallel_tool_calls=N``, exactly N calls that
   cycle through the tools (a tool called again gets different arguments);
2. else, an output tool is offered (pydantic-ai names them ``final_result*``):
   call the first one;
3. else, a JSON-schema answer format is asked for: answer text that is a JSON
   document matching it;
4. else: answer ``text``.

Arguments are built from each tool's JSON schema (required fields only): strings
``"a"`` (or the schema's example / enum / format), numbers 1, booleans false,
one-item arrays, nested objects, ``$ref`` and ``anyOf`` followed.
Every answer carries usage whose total is input + output. Every request is
recorded (``requests``); the server writes nothing to stdout or stderr: an
exception in a handler is kept in ``errors`` and answered with a 500.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

DEFAULT_TEXT = "Stand-in answer from the loopback OpenAI API."
OUTPUT_TOOL_PREFIX = "final_result"
_FORMAT_EXAMPLES = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00",
    "duration": "P1D",
    "email": "a@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "hostname": "example.com",
}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    """Header names lower-cased."""
    body: Any
    """The parsed JSON body (None when there was none or it was not JSON)."""


@dataclass(frozen=True)
class _Call:
    name: str
    arguments: str


@dataclass(frozen=True)
class _Answer:
    text: str | None = None
    calls: tuple[_Call, ...] = ()


@dataclass
class _Turn:
    """What the answer is decided from, taken from either API's request shape."""

    function_tools: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    output_tools: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    has_tool_result: bool = False
    answer_schema: dict[str, Any] | None = None


def example_from_schema(schema: dict[str, Any], variant: int = 0) -> Any:
    """A value valid against ``schema``; a different ``variant`` gives a different value
    where the schema allows one."""
    return _Examples(schema, variant).build(schema)


class _Examples:
    def __init__(self, root: dict[str, Any], variant: int) -> None:
        self.root = root
        self.variant = variant
        self.expanding: list[str] = []
        """The $refs being built: a nullable branch back into one of them is left null, so
        recursive models end."""

    def build(self, schema: Any, offset: int = 0) -> Any:
        if not isinstance(schema, dict) or "$ref" not in schema:
            return _example(schema, self, self.variant + offset)
        ref = schema["$ref"]
        target: Any = self.root
        for key in ref.removeprefix("#").split("/"):
            if key:
                target = target[key.replace("~1", "/").replace("~0", "~")]
        self.expanding.append(ref)
        try:
            return self.build(target, offset)
        finally:
            self.expanding.pop()


def _example(schema: Any, examples: _Examples, variant: int) -> Any:
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        options = schema["enum"]
        return options[variant % len(options)]
    if schema.get("examples") and variant == 0:
        return schema["examples"][0]
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema:
            branches = [b for b in schema[combinator]
                        if b.get("type") != "null" and b.get("$ref") not in examples.expanding]
            if not branches:
                nullable = {"type": "null"} in schema[combinator]
                return None if nullable else examples.build(schema[combinator][0])
            return examples.build(branches[0])
    if "allOf" in schema:
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(part)
        return examples.build(merged)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        properties = schema.get("properties", {})
        return {
            name: examples.build(properties.get(name, {})) for name in schema.get("required", [])
        }
    if kind == "array":
        count = max(schema.get("minItems", 1), 1)
        if "maxItems" in schema:
            count = min(count, schema["maxItems"])
        if isinstance(schema.get("prefixItems"), list):
            return [examples.build(s) for s in schema["prefixItems"]]
        return [examples.build(schema.get("items", {}), i) for i in range(count)]
    if kind in ("integer", "number"):
        return _number(schema, variant)
    if kind == "boolean":
        return variant % 2 == 1
    if kind == "null":
        return None
    return _string(schema, variant)


def _number(schema: dict[str, Any], variant: int) -> int:
    low = schema.get("minimum")
    if low is None and "exclusiveMinimum" in schema:
        low = schema["exclusiveMinimum"] + 1
    high = schema.get("maximum")
    if high is None and "exclusiveMaximum" in schema:
        high = schema["exclusiveMaximum"] - 1
    value = 1 + variant
    if low is not None and value < low:
        value = int(low) + variant
    if high is not None and value > high:
        value = int(high)
    return value


def _string(schema: dict[str, Any], variant: int) -> str:
    if schema.get("format") in _FORMAT_EXAMPLES:
        return _FORMAT_EXAMPLES[schema["format"]]
    text = "a" if variant == 0 else f"a{variant}"
    text = text.ljust(schema.get("minLength", 0), "a")
    if "maxLength" in schema:
        text = text[: schema["maxLength"]]
    return text


def _tokens(value: Any) -> int:
    """A deterministic stand-in for a token count: about four characters a token."""
    return max(1, len(json.dumps(value, default=str)) // 4)


def _chunks(text: str, size: int) -> list[str]:
    """Split ``text`` into pieces of about ``size`` words, keeping every character."""
    words = text.split(" ")
    pieces = [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    return [p + " " for p in pieces[:-1]] + pieces[-1:]


def _halves(text: str) -> list[str]:
    middle = len(text) // 2
    return [part for part in (text[:middle], text[middle:]) if part]


def _function_tools(tools: list[Any], *, nested: bool) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for tool in tools or []:
        if not isinstance(tool, dict) or tool.get("type") != "function":
            continue
        spec = tool.get("function", {}) if nested else tool
        found.append((spec["name"], spec.get("parameters") or {"type": "object", "properties": {}}))
    return found


def _split_tools(turn: _Turn, tools: list[tuple[str, dict[str, Any]]]) -> None:
    for name, schema in tools:
        target = turn.output_tools if name.startswith(OUTPUT_TOOL_PREFIX) else turn.function_tools
        target.append((name, schema))


def _responses_turn(body: dict[str, Any]) -> _Turn:
    turn = _Turn()
    _split_tools(turn, _function_tools(body.get("tools", []), nested=False))
    items = body.get("input")
    items = items if isinstance(items, list) else []
    last_user = max((i for i, item in enumerate(items) if item.get("role") == "user"), default=-1)
    turn.has_tool_result = any(item.get("type") == "function_call_output" for item in items[last_user + 1 :])
    answer_format = (body.get("text") or {}).get("format") or {}
    if answer_format.get("type") == "json_schema":
        turn.answer_schema = answer_format.get("schema", {})
    return turn


def _chat_turn(body: dict[str, Any]) -> _Turn:
    turn = _Turn()
    _split_tools(turn, _function_tools(body.get("tools", []), nested=True))
    messages = body.get("messages", [])
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    turn.has_tool_result = any(m.get("role") == "tool" for m in messages[last_user + 1 :])
    answer_format = body.get("response_format") or {}
    if answer_format.get("type") == "json_schema":
        turn.answer_schema = (answer_format.get("json_schema") or {}).get("schema", {})
    return turn


class OpenAIStandin:
    """The stand-in server; ``with OpenAIStandin(...) as api:`` runs it on a free loopback port.

    Options (plain attributes: a test may change them between requests):

    - ``text``: the text answer.
    - ``parallel_tool_calls``: None calls each function tool once per turn; N makes
      exactly N calls in one answer, cycling through the tools.
    - ``stream_words``: words per text delta when streaming.
    """

    def __init__(self, *, text: str = DEFAULT_TEXT, parallel_tool_calls: int | None = None,
                 stream_words: int = 2) -> None:
        if parallel_tool_calls is not None and parallel_tool_calls < 1:
            raise ValueError(f"parallel_tool_calls must be at least 1, got {parallel_tool_calls}")
        self.text = text
        self.parallel_tool_calls = parallel_tool_calls
        self.stream_words = stream_words
        self.errors: list[BaseException] = []
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> OpenAIStandin:
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-standin", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            connections = list(self._connections)
        # Kept-alive client connections would otherwise leave handler threads waiting.
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> OpenAIStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- what tests read -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None, "the stand-in is not running"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def env(self) -> dict[str, str]:
        """The environment variables that point the openai SDK (and so pydantic-ai) here."""
        return {"OPENAI_BASE_URL": self.base_url, "OPENAI_API_KEY": "test"}

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def bodies(self, path: str) -> list[Any]:
        """The JSON bodies of the requests to ``path`` (e.g. ``/v1/responses``), in order."""
        return [r.body for r in self.requests if r.path == path]

    # --- behaviour -------------------------------------------------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _track(self, connection: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def _decide(self, turn: _Turn) -> _Answer:
        if turn.function_tools and not turn.has_tool_result:
            tools = turn.function_tools
            count = self.parallel_tool_calls or len(tools)
            return _Answer(calls=tuple(
                _Call(tools[i % len(tools)][0],
                      json.dumps(example_from_schema(tools[i % len(tools)][1], i // len(tools))))
                for i in range(count)
            ))
        if turn.output_tools:
            name, schema = turn.output_tools[0]
            return _Answer(calls=(_Call(name, json.dumps(example_from_schema(schema))),))
        if turn.answer_schema is not None:
            return _Answer(text=json.dumps(example_from_schema(turn.answer_schema)))
        return _Answer(text=self.text)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler], standin: OpenAIStandin) -> None:
        self.standin = standin
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a test reads `errors` instead.
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, (ConnectionError, TimeoutError)):
            self.standin.errors.append(error)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.standin._track(self.connection, True)

    def finish(self) -> None:
        self.server.standin._track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        standin = self.server.standin
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        path = self.path.split("?", 1)[0]
        standin._record(RecordedRequest(self.command, path, {k.lower(): v for k, v in self.headers.items()},
                                        body))
        if self.command != "POST" or path not in ("/v1/responses", "/v1/chat/completions"):
            self._error(404, f"Unknown request URL: {self.command} {path}.", "unknown_url")
            return
        if not isinstance(body, dict):
            self._error(400, "We could not parse the JSON body of your request.", None)
            return
        try:
            if path == "/v1/responses":
                _ResponsesAnswer(standin, body).send(self)
            else:
                _ChatAnswer(standin, body).send(self)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # answered as the real API would, and kept for the test to see
            standin.errors.append(error)
            self._error(500, f"stand-in failure: {error!r}", None)

    def _error(self, status: int, message: str, code: str | None) -> None:
        self.send_json(status, {"error": {"message": message, "type": "invalid_request_error",
                                          "param": None, "code": code}})

    def send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex}")
        self.end_headers()
        self.wfile.write(data)

    def start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex}")
        self.end_headers()

    def send_event(self, data: str, event: str | None = None) -> None:
        text = (f"event: {event}\n" if event else "") + f"data: {data}\n\n"
        chunk = text.encode()
        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        self.wfile.flush()

    def end_events(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _ResponsesAnswer:
    """One answer of ``POST /v1/responses``, shaped as openai.types.responses.Response."""

    def __init__(self, standin: OpenAIStandin, body: dict[str, Any]) -> None:
        self.standin = standin
        self.body = body
        self.answer = standin._decide(_responses_turn(body))
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.call_ids = [(f"fc_{uuid.uuid4().hex}", f"call_{uuid.uuid4().hex[:24]}")
                         for _ in self.answer.calls]

    def _message(self, text: str, status: str) -> dict[str, Any]:
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status,
                "content": [] if status == "in_progress" else [self._text_part(text)]}

    @staticmethod
    def _text_part(text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _call(self, index: int, status: str) -> dict[str, Any]:
        call = self.answer.calls[index]
        item_id, call_id = self.call_ids[index]
        return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id,
                "name": call.name, "arguments": call.arguments if status == "completed" else ""}

    def _output(self) -> list[dict[str, Any]]:
        if self.answer.text is not None:
            return [self._message(self.answer.text, "completed")]
        return [self._call(i, "completed") for i in range(len(self.answer.calls))]

    def _response(self, status: str) -> dict[str, Any]:
        body = self.body
        done = status == "completed"
        output = self._output() if done else []
        usage = None
        if done:
            input_tokens = _tokens([body.get("instructions"), body.get("input"), body.get("tools")])
            output_tokens = _tokens([self.answer.text, [c.arguments for c in self.answer.calls]])
            usage = {"input_tokens": input_tokens,
                     "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                     "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": input_tokens + output_tokens}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "completed_at": int(time.time()) if done else None, "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"), "model": body.get("model", "gpt-5.2"),
            "output": output, "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
            "store": body.get("store", True), "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools", []),
            "top_p": body.get("top_p", 1.0), "truncation": body.get("truncation", "disabled"),
            "usage": usage, "user": None, "metadata": body.get("metadata") or {},
        }

    def send(self, handler: _Handler) -> None:
        if not self.body.get("stream"):
            handler.send_json(200, self._response("completed"))
            return
        handler.start_events()
        sequence = itertools.count()

        def emit(kind: str, **fields: Any) -> None:
            handler.send_event(json.dumps({"type": kind, "sequence_number": next(sequence), **fields}), kind)

        emit("response.created", response=self._response("in_progress"))
        emit("response.in_progress", response=self._response("in_progress"))
        if self.answer.text is not None:
            text = self.answer.text
            where = {"item_id": self.message_id, "output_index": 0}
            emit("response.output_item.added", output_index=0, item=self._message(text, "in_progress"))
            emit("response.content_part.added", **where, content_index=0, part=self._text_part(""))
            for piece in _chunks(text, self.standin.stream_words):
                emit("response.output_text.delta", **where, content_index=0, delta=piece, logprobs=[])
            emit("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
            emit("response.content_part.done", **where, content_index=0, part=self._text_part(text))
            emit("response.output_item.done", output_index=0, item=self._message(text, "completed"))
        for index, call in enumerate(self.answer.calls):
            where = {"item_id": self.call_ids[index][0], "output_index": index}
            emit("response.output_item.added", output_index=index, item=self._call(index, "in_progress"))
            for piece in _halves(call.arguments):
                emit("response.function_call_arguments.delta", **where, delta=piece)
            emit("response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments)
            emit("response.output_item.done", output_index=index, item=self._call(index, "completed"))
        emit("response.completed", response=self._response("completed"))
        handler.end_events()


class _ChatAnswer:
    """One answer of ``POST /v1/chat/completions``, shaped as openai.types.chat.ChatCompletion(Chunk)."""

    def __init__(self, standin: OpenAIStandin, body: dict[str, Any]) -> None:
        self.standin = standin
        self.body = body
        self.answer = standin._decide(_chat_turn(body))
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.call_ids = [f"call_{uuid.uuid4().hex[:24]}" for _ in self.answer.calls]
        self.finish_reason = "tool_calls" if self.answer.calls else "stop"

    def _tool_calls(self) -> list[dict[str, Any]]:
        return [{"id": call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for call_id, c in zip(self.call_ids, self.answer.calls, strict=True)]

    def _usage(self) -> dict[str, Any]:
        prompt = _tokens([self.body.get("messages"), self.body.get("tools")])
        completion = _tokens([self.answer.text, [c.arguments for c in self.answer.calls]])
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0,
                                              "rejected_prediction_tokens": 0}}

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.body.get("model", "gpt-5.2"), "service_tier": "default",
                "system_fingerprint": None}

    def send(self, handler: _Handler) -> None:
        if not self.body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": self.answer.text, "refusal": None,
                                       "annotations": []}
            if self.answer.calls:
                message["tool_calls"] = self._tool_calls()
            handler.send_json(200, {**self._envelope("chat.completion"), "usage": self._usage(), "choices": [
                {"index": 0, "message": message, "finish_reason": self.finish_reason, "logprobs": None}]})
            return
        with_usage = bool((self.body.get("stream_options") or {}).get("include_usage"))
        handler.start_events()

        def emit(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            chunk = {**self._envelope("chat.completion.chunk"),
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                  "logprobs": None}]}
            if with_usage:
                chunk["usage"] = None
            handler.send_event(json.dumps(chunk))

        emit({"role": "assistant", "content": "" if self.answer.text is not None else None, "refusal": None})
        if self.answer.text is not None:
            for piece in _chunks(self.answer.text, self.standin.stream_words):
                emit({"content": piece})
        for index, (call_id, call) in enumerate(zip(self.call_ids, self.answer.calls, strict=True)):
            emit({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                  "function": {"name": call.name, "arguments": ""}}]})
            for piece in _halves(call.arguments):
                emit({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
        emit({}, self.finish_reason)
        if with_usage:
            handler.send_event(json.dumps({**self._envelope("chat.completion.chunk"), "choices": [],
                                           "usage": self._usage()}))
        handler.send_event("[DONE]")
        handler.end_events()


@pytest.fixture
def openai_standin() -> Iterator[OpenAIStandin]:
    """A running stand-in with default options; set ``text`` / ``parallel_tool_calls`` on it as needed."""
    with OpenAIStandin() as standin:
        yield standin
