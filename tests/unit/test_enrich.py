"""What ``enrich.for_mlflow`` makes of pydantic-ai's spans, in process and in
seconds (no MLflow, no subprocess): each run of tests/support/conversations.py is
recorded with an in-memory exporter and every model call's chat view is
checked against what MLflow's UI can render. tests/test_browser.py checks the
same runs in the real UI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import json_depth
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceState
from pydantic_ai import Agent
from pydantic_ai.models.instrumented import InstrumentationSettings
from support import conversations

from traced_run.config.settings import Settings
from traced_run.delivery.export import encode, request_bytes
from traced_run.spans.enrich import (
    MAX_NESTING,
    NESTING_CUT,
    SPAN_INPUTS,
    SPAN_OUTPUTS,
    for_mlflow,
    nesting_bounded,
)

WITHHELD = "[content not exported]"


@pytest.fixture
def record() -> Iterator[Any]:
    """Runs one kind of conversation; gives its spans as MLflow gets them, in end order."""

    def run(kind: str, settings: Settings | None = None) -> list[ReadableSpan]:
        settings = settings or Settings()
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        Agent.instrument_all(InstrumentationSettings(tracer_provider=provider,
                                                     include_content=settings.include_content))
        conversations.KINDS[kind]()
        return [for_mlflow(span, settings) for span in exporter.get_finished_spans()]

    yield run
    Agent.instrument_all(False)


def model_calls(spans: list[ReadableSpan]) -> list[tuple[list[Any], list[Any]]]:
    """Each LLM span's chat inputs and outputs, in the order the calls ended."""
    return [(json.loads(str(attributes[SPAN_INPUTS])), json.loads(str(attributes[SPAN_OUTPUTS])))
            for attributes in (span.attributes or {} for span in spans)
            if attributes.get("openinference.span.kind") == "LLM"]


def renders_as_chat(messages: list[Any]) -> bool:
    """MLflow 3.17's UI (its OTel GenAI message parser) shows ``messages`` as a
    conversation only if every part is text with content, a named tool call or
    a tool result with a response; a message yields at most one tool result,
    and none beside text or calls. Anything else: a YAML dump, or lost results."""
    for message in messages:
        parts = message.get("parts")
        if not isinstance(message.get("role"), str) or not parts:
            return False
        for part in parts:
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("content"), str):
                continue
            if kind == "tool_call" and isinstance(part.get("name"), str):
                continue
            if kind == "tool_call_response" and "response" in part:
                continue
            return False
        results = sum(part["type"] == "tool_call_response" for part in parts)
        if results and len(parts) > 1:
            return False
    return True


def text(role: str, *contents: str) -> dict[str, Any]:
    return {"role": role, "parts": [{"type": "text", "content": content} for content in contents]}


def call(*tools: str, customer: str = "cust-Q7") -> dict[str, Any]:
    return {"role": "assistant", "parts": [{"type": "tool_call", "id": f"call_{tool}", "name": tool,
                                            "arguments": {"customer": customer}} for tool in tools]}


def result(tool: str, response: Any, tool_id: str | None = None) -> dict[str, Any]:
    return {"role": "tool", "parts": [{"type": "tool_call_response", "id": tool_id or f"call_{tool}",
                                       "name": tool, "response": response}]}


SYSTEM = text("system", "Be brief.")
USER = text("user", conversations.PROMPT)


@pytest.mark.parametrize("kind", list(conversations.KINDS))
def test_every_model_call_renders_as_a_chat(record: Any, kind: str) -> None:
    calls = model_calls(record(kind))
    assert calls
    for inputs, outputs in calls:
        assert renders_as_chat(inputs), inputs
        assert renders_as_chat(outputs), outputs


@pytest.mark.parametrize("kind, tools", [("two-tools", ("balance", "orders")),
                                         ("three-tools", ("balance", "orders", "address"))])
def test_parallel_tool_calls_each_get_a_result_message(record: Any, kind: str,
                                                       tools: tuple[str, ...]) -> None:
    asking, answering = model_calls(record(kind))
    assert asking == ([SYSTEM, USER], [call(*tools)])
    results = [result(tool, f"cust-Q7 {conversations.RESULTS[tool]}") for tool in tools]
    answer = text("assistant", f"Done: {len(tools)} lookups.")
    assert answering == ([SYSTEM, USER, call(*tools), *results], [answer])


def test_retries_show_the_validation_errors_and_the_retry_prompt(record: Any) -> None:
    *_, (inputs, outputs) = model_calls(record("retries"))
    invalid, retried = (m["parts"][0] for m in inputs if m["role"] == "tool")
    assert invalid["id"] == "call_bad" and [e["msg"] for e in invalid["response"]] == [
        "Field required", "Input should be a valid integer, unable to parse string as an integer"]
    assert retried["id"] == "call_retry"
    assert "Order o-1 was never paid: ask the customer for another order." in retried["response"]
    assert outputs == [text("assistant", "Refund not possible for o-1.")]


def test_structured_output_is_the_final_result_call(record: Any) -> None:
    ((inputs, outputs),) = model_calls(record("structured"))
    assert inputs == [text("user", "Refund o-1 by 12.50.")]
    final = {"type": "tool_call", "id": "call_out", "name": "final_result",
             "arguments": {"order": "o-1", "amount": 12.5}}
    assert outputs == [{"role": "assistant", "parts": [final]}]


def test_a_second_turn_carries_the_first(record: Any) -> None:
    first, second = model_calls(record("multi-turn"))
    assert first == ([text("user", "Hi there.")], [text("assistant", "Hello! How can I help?")])
    history = [text("user", "Hi there."), text("assistant", "Hello! How can I help?")]
    assert second == ([*history, text("user", "When does my order ship?")],
                      [text("assistant", "Your order ships Friday.")])


def test_instructions_come_first_then_the_system_prompt(record: Any) -> None:
    ((inputs, _),) = model_calls(record("prompts"))
    assert inputs == [text("system", "Answer in one sentence.\n\nThe customer is on the gold tier."),
                      text("system", "You are the support desk of ACME."), text("user", "Can I upgrade?")]


def test_thinking_is_text_that_says_so(record: Any) -> None:
    ((_, outputs),) = model_calls(record("thinking"))
    assert outputs == [text("assistant", "[thinking] The customer wants a date; orders ship on Fridays.",
                            "Friday.")]


def test_images_are_placeholders_in_the_chat_and_bounded_elsewhere(record: Any) -> None:
    pixel = len(conversations.PIXEL)
    spans = record("images")
    ((inputs, _),) = model_calls(spans)
    assert inputs == [text("user", "What are these?", f"[image/png: {conversations.IMAGE_URL}]",
                           f"[image/png, {pixel} bytes]")]
    (llm,) = (span for span in spans if span.name.startswith("chat "))
    assert "iVBORw0KGgo" in str((llm.attributes or {})["gen_ai.input.messages"])  # within max_binary_bytes
    bounded = record("images", Settings(max_binary_bytes=16))
    values = [str(value) for span in bounded for value in (span.attributes or {}).values()]
    assert not [value for value in values if "iVBORw0KGgo" in value]
    assert any(f"[{pixel} bytes not exported: over max_binary_bytes=16]" in value for value in values)


def test_streamed_runs_match_the_plain_run_and_their_tokens_add_up(record: Any) -> None:
    spans = record("streamed")
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        by_trace.setdefault(span.context.trace_id, []).append(span)
    conversations_seen = []
    for trace in by_trace.values():
        conversations_seen.append(model_calls(trace))
        for span in trace:
            attributes = span.attributes or {}
            if attributes.get("openinference.span.kind") != "LLM":
                continue
            prompt = attributes["llm.token_count.prompt"]
            completion = attributes["llm.token_count.completion"]
            assert isinstance(prompt, int) and isinstance(completion, int)
            assert attributes["llm.token_count.total"] == prompt + completion, span.name
    plain, *streamed = conversations_seen
    assert len(streamed) == 3 and all(each == plain for each in streamed)


def test_without_content_the_chat_keeps_roles_and_tool_names_only(record: Any) -> None:
    spans = record("two-tools", Settings(include_content=False))
    _, (inputs, outputs) = model_calls(spans)
    assert [m["role"] for m in inputs] == ["user", "assistant", "tool", "tool"]
    assert [p["name"] for m in inputs for p in m["parts"] if "name" in p] == ["balance", "orders"] * 2
    assert inputs[0] == text("user", WITHHELD) and outputs == [text("assistant", WITHHELD)]
    assert renders_as_chat(inputs) and renders_as_chat(outputs)
    values = " ".join(str(value) for span in spans for value in (span.attributes or {}).values())
    for said in (conversations.PROMPT, "Be brief.", "42.50", "in transit", "cust-Q7", "Done: 2 lookups."):
        assert said not in values


def test_mlflow_gets_what_it_reads_and_not_openinferences_flattened_copies(record: Any) -> None:
    """MLflow's translation reads OpenInference's span kind, inputs, outputs, model,
    provider and token counts, its chat view ``mlflow.spanInputs``/``Outputs``; the
    ``llm.input_messages.*``/``llm.output_messages.*``/``llm.tools.*`` copies of the
    messages and tool definitions, half of a model call's attributes, it never reads."""
    spans = record("two-tools")
    unread = ("llm.input_messages.", "llm.output_messages.", "llm.tools.")
    kinds = []
    for span in spans:
        attributes = span.attributes or {}
        kinds.append(attributes["openinference.span.kind"])
        assert not [key for key in attributes if key.startswith(unread)], span.name
        if attributes["openinference.span.kind"] == "LLM":
            assert attributes["llm.model_name"] and attributes["llm.provider"], span.name
            assert isinstance(attributes["llm.token_count.total"], int), span.name
            assert {SPAN_INPUTS, SPAN_OUTPUTS, "gen_ai.input.messages", "gen_ai.tool.definitions"} <= set(
                attributes), span.name
        else:
            assert {"input.value", "output.value"} <= set(attributes), span.name
    assert sorted(kinds) == ["AGENT", "LLM", "LLM", "TOOL", "TOOL"]


def test_a_secret_anywhere_in_a_span_is_redacted_and_a_span_without_one_is_kept_as_it_is() -> None:
    """The default rules screen a span's texts together, once: one secret in one of many
    texts (an attribute, a list item, an event, the status, the name) still sends every
    text through the rules; a span with none keeps them all, its resource still redacted."""
    settings = Settings()
    resource = Resource({"service.name": "bot", "deploy.url": "https://ci:hunter2pass@ci.example/x"})
    plain = {f"app.note.{n}": f"note {n} of a long and harmless conversation" for n in range(30)}
    secrets = {
        "app.keys": ("nothing here", "sk-proj-A1b2C3d4E5f6G7h8I9j0"),
        "app.header": "Authorization: Bearer abc.def-ghi_123",
    }
    for where, secret, redacted in [
        ("attributes", {"app.keys": secrets["app.keys"]}, "[REDACTED]"),
        ("attributes", {"app.header": secrets["app.header"]}, "Authorization: Bearer [REDACTED]"),
        ("event", {}, "key [REDACTED]"),
        ("status", {}, "postgres://bob:[REDACTED]@db:5432/app"),
        ("name", {}, "call AKIA [REDACTED]"),
    ]:
        span = ReadableSpan(
            name="call AKIA AKIAABCDEFGHIJKLMNOP" if where == "name" else "call",
            attributes={**plain, **secret}, resource=resource,
            events=[Event("said", {"text": "key sk-ant-api03-abcdefghijklmnopqrstuv" if where == "event"
                                   else "nothing"})],
            status=Status(StatusCode.ERROR, "postgres://bob:pa55word@db:5432/app" if where == "status"
                          else "failed"))
        copy = for_mlflow(span, settings)
        texts = [copy.name, copy.status.description or "", *(str(e.attributes) for e in copy.events),
                 *(str(value) for value in (copy.attributes or {}).values())]
        assert any(redacted in text for text in texts), (where, texts)
        for secret_text in ("sk-proj-A1b2", "abc.def-ghi_123", "sk-ant-api03", "pa55word", "AKIAABCD"):
            assert not [text for text in texts if secret_text in text], (where, secret_text)
        assert copy.resource.attributes["deploy.url"] == "https://ci:[REDACTED]@ci.example/x"
    harmless = for_mlflow(ReadableSpan(name="call", attributes=plain, resource=resource), settings)
    assert {key: (harmless.attributes or {})[key] for key in plain} == plain
    assert harmless.resource.attributes["deploy.url"] == "https://ci:[REDACTED]@ci.example/x"


@pytest.mark.parametrize("kind", list(conversations.KINDS))
def test_the_request_is_the_sdks_encoding_byte_for_byte(record: Any, kind: str) -> None:
    spans = record(kind)
    assert request_bytes(spans) == encode_spans(spans).SerializeToString()


def test_every_field_and_value_type_is_encoded_as_the_sdk_encodes_it() -> None:
    """What pydantic-ai's spans do not show: events, links, remote parents, trace state,
    every attribute type, values the SDK leaves out, several resources and scopes."""
    remote = SpanContext(0xA1, 0xB2, is_remote=True, trace_state=TraceState([("k", "v"), ("x", "y")]))
    local = SpanContext(0xC3 << 100, 0xD4 << 50, is_remote=False)
    values: dict[str, Any] = {
        "text": "héllo ✓", "empty": "", "yes": True, "no": False, "zero": 0, "big": 2**62, "negative": -5,
        "pi": 3.25, "raw": b"\x00\xff", "texts": ("a", ""), "numbers": [1, -2], "flags": (True, False),
        "floats": (0.5,), "nothing": None, "mapping": {"a": 1, "b": ["c"]}, "object": object(),
        "nested": [("a", 1)],
    }
    scopes = [InstrumentationScope("pydantic-ai", "2.0", "https://schema/1", {"s": 1}),
              InstrumentationScope("app"), None]
    resources = [Resource({"service.name": "bot"}, "https://schema/r"), Resource({"service.name": "other"})]
    spans = [
        ReadableSpan(name=f"span {n}", context=SpanContext(0xE5 + n, 0xF6 + n, is_remote=False),
                     parent=(remote, local, None)[n % 3], resource=resources[n % 2],
                     instrumentation_scope=scopes[n % 3], attributes=values if n < 3 else {},
                     events=[Event("said", {"n": n, "what": "x"}, 10 + n), Event("", None, 0)][: n % 3],
                     links=[Link(local, {"why": "because"}), Link(remote)][: n % 3],
                     kind=list(SpanKind)[n % 5], start_time=n and 1700000000000000000 + n,
                     end_time=n and 1700000000000000100 + n,
                     status=[Status(StatusCode.ERROR, "bad ✗"), Status(StatusCode.OK), Status()][n % 3])
        for n in range(7)
    ]
    assert request_bytes(spans) == encode_spans(spans).SerializeToString()
    assert request_bytes([]) == encode_spans([]).SerializeToString()


def test_keys_that_keep_changing_do_not_grow_the_key_cache_without_bound() -> None:
    from traced_run.delivery import export

    context = SpanContext(0xA1, 0xB2, is_remote=False)
    for n in range(3 * export._KEYS_BOUND):
        span = ReadableSpan("step", context=context, resource=Resource({}), attributes={f"order.{n}": n},
                            start_time=1, end_time=2)
        assert request_bytes([span]) == encode_spans([span]).SerializeToString()
    assert len(export._KEYS) <= export._KEYS_BOUND


# -- what no encoder could take (issue 23) --------------------------------------------------

def test_a_lone_surrogate_anywhere_is_sent_as_its_escape_and_the_span_kept() -> None:
    """A file name as os.listdir decodes it has no UTF-8: the SDK leaves such an attribute out
    and raised on it elsewhere (the status of a tool that failed on it); MLflow gets the text,
    the surrogate written as its escape."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    name = "r\udcffsum\udce9.txt"
    span = ReadableSpan(
        f"open {name}", context=SpanContext(0xA1, 0xB2, is_remote=False), start_time=1, end_time=2,
        resource=Resource({"host.dir": name}), instrumentation_scope=InstrumentationScope(name),
        attributes={"file": name, f"key {name}": "value", "files": (name, "plain")},
        events=[Event("exception", {"exception.message": f"cannot open {name}"}, 1)],
        status=Status(StatusCode.ERROR, f"OSError: cannot open {name}"))
    request = ExportTraceServiceRequest.FromString(encode([span], Settings()))
    resource = request.resource_spans[0]
    sent = resource.scope_spans[0].spans[0]
    shown = "r\\udcffsum\\udce9.txt"
    assert sent.name == f"open {shown}"
    assert sent.status.message == f"OSError: cannot open {shown}"
    attributes = {item.key: item.value for item in sent.attributes}
    assert attributes["file"].string_value == shown
    assert attributes[f"key {shown}"].string_value == "value"
    assert [value.string_value for value in attributes["files"].array_value.values] == [shown, "plain"]
    assert sent.events[0].attributes[0].value.string_value == f"cannot open {shown}"
    assert resource.resource.attributes[0].value.string_value == shown
    assert resource.scope_spans[0].scope.name == shown


def _nested(depth: int) -> str:
    return '{"data": ' + "[" * depth + "1" + "]" * depth + "}"


@pytest.mark.parametrize("depth", [40, 900, 3000])
def test_tool_arguments_nested_past_the_bound_are_cut_with_a_marker(depth: int) -> None:
    """A model's tool call as pydantic-ai records it, its arguments as the model sent them
    (text, in the model call's outputs) and as the tool got them: every JSON value MLflow gets
    parses, within MAX_NESTING, the part past it replaced by the marker."""
    arguments = _nested(depth)
    call = [{"role": "assistant", "parts": [{"type": "tool_call", "id": "c1", "name": "store",
                                              "arguments": arguments}]}]
    model_call = ReadableSpan("chat model", attributes={
        "gen_ai.operation.name": "chat", "gen_ai.input.messages": json.dumps([text("user", "store it")]),
        "gen_ai.output.messages": json.dumps(call)})
    tool = ReadableSpan("execute_tool store", attributes={
        "gen_ai.tool.name": "store", "gen_ai.tool.call.arguments": arguments})
    for span in (model_call, tool):
        attributes = for_mlflow(span, Settings()).attributes or {}
        values = [json.loads(value) for value in attributes.values()
                  if isinstance(value, str) and value[:1] in ("[", "{")]
        assert values and all(json_depth(value) <= MAX_NESTING for value in values)
        assert any(NESTING_CUT in json.dumps(value) for value in values), attributes


def test_the_nesting_bound_reads_json_as_json() -> None:
    shallow = json.dumps([{"text": "[[[[" * 40, "quote\"[": [[1]]}] * 40)
    assert nesting_bounded(shallow) is shallow  # brackets in strings, escapes: not nesting
    deep = "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)
    assert json.loads(nesting_bounded(deep)) == json.loads("[" * MAX_NESTING + json.dumps(NESTING_CUT)
                                                         + "]" * MAX_NESTING)
    siblings = json.loads(nesting_bounded(json.dumps({"a": json.loads(deep), "b": "kept", "c": [2]})))
    assert siblings["b"] == "kept" and siblings["c"] == [2] and json_depth(siblings) == MAX_NESTING
    unclosed = "[" * 5000  # not JSON: cut all the same, never a RecursionError
    assert nesting_bounded(unclosed) == "[" * MAX_NESTING + json.dumps(NESTING_CUT)
    assert nesting_bounded("not JSON [[[" + "[" * 100) == "not JSON [[[" + "[" * 100
