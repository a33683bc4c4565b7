"""Turns each finished span into the copy MLflow gets: OpenInference's
attributes added, conversations shaped for MLflow's chat view, trace metadata
set, content withheld or bounded, secrets redacted.

OpenInference's processor rewrites the span it is given in place; working on a
copy keeps the app's other exporters (logfire, its own) seeing pydantic-ai's
spans as they were, and lets the work happen on the delivery thread instead of
the thread that ended the span. Processor order stops mattering. Everything
here runs before a span is encoded, so nothing withheld or redacted reaches
the spool or the network.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from itertools import accumulate
from typing import Any

from openinference.instrumentation.pydantic_ai import OpenInferenceSpanProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import AttributeValue

from traced_run.config.settings import Settings
from traced_run.spans.messages import attachment, base64_size, last_prompt
from traced_run.spans.redact import DEFAULT_RULES, Redactor, Rule
from traced_run.spans.selection import copy_span

_processor = OpenInferenceSpanProcessor()

SPAN_INPUTS = "mlflow.spanInputs"
SPAN_OUTPUTS = "mlflow.spanOutputs"
TRACE_TAG = "mlflow.traceTag."
TRACE_NAME_TAG = TRACE_TAG + "mlflow.traceName"

_MESSAGE_ATTRIBUTES = ("gen_ai.input.messages", "gen_ai.output.messages", "pydantic_ai.all_messages",
                       "gen_ai.system_instructions")
"""pydantic-ai's JSON message lists: parts of these are bounded or withheld."""
_CONTENT_ATTRIBUTES = ("gen_ai.system_instructions", "gen_ai.tool.call.arguments", "gen_ai.tool.call.result",
                       "tool.parameters", "final_result", "input.value", "output.value")
_CONTENT_SUFFIXES = (".message.content", ".message_content.text", ".message_content.image.image.url",
                     ".tool_call.function.arguments")
_CONTENT_KEYS = ("content", "arguments", "result", "response")
"""Keys of a message part that carry text, as opposed to its type, id and tool name."""


class _Config:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        own = tuple(Rule(pattern) for pattern in settings.redact)
        rules = (DEFAULT_RULES if settings.redact_defaults else ()) + own
        self.redactor = Redactor(rules, settings.redaction_marker)
        self.resources: dict[int, tuple[Resource, Resource]] = {}


_config: _Config | None = None


def _config_for(settings: Settings) -> _Config:
    """Compiled once per process (the settings object is the process's own)."""
    global _config
    config = _config
    if config is None or config.settings is not settings:
        config = _config = _Config(settings)
    return config


def for_mlflow(span: ReadableSpan, settings: Settings) -> ReadableSpan:
    """The copy of ``span`` MLflow gets under ``settings``."""
    config = _config_for(settings)
    attributes: dict[str, AttributeValue] = dict(span.attributes or {})
    inputs, outputs = _json(attributes.get(_INPUT_MESSAGES)), _json(attributes.get(_OUTPUT_MESSAGES))
    chat = isinstance(inputs, list) and isinstance(outputs, list)
    copy = _explained(_openinference(span, attributes, chat=chat))
    _agent_prompt(attributes)
    _span_type(attributes)
    _metadata(attributes, settings, is_root=span.parent is None)
    if not settings.include_content:
        _withhold_content(attributes)
        inputs, outputs = _json(attributes.get(_INPUT_MESSAGES)), _json(attributes.get(_OUTPUT_MESSAGES))
    _conversation(attributes, inputs, outputs)
    _token_total(attributes)
    _bound_binary(attributes, settings.max_binary_bytes)
    _bound_nesting(attributes)
    redactor = config.redactor
    if not redactor:
        return copy_span(copy, attributes)
    if not redactor.needed(_texts(copy, attributes)):
        return copy_span(copy, attributes, resource=_redacted_resource(copy.resource, config))
    text = redactor.redact
    return copy_span(
        copy,
        {key: value if key in _TYPES else _redact_value(value, text) for key, value in attributes.items()},
        name=text(copy.name),
        events=[Event(text(event.name), _redact_attributes(event.attributes, text), event.timestamp)
                for event in copy.events],
        status=Status(copy.status.status_code, text(copy.status.description))
        if copy.status.description else copy.status,
        resource=_redacted_resource(copy.resource, config),
    )


# -- OpenInference -------------------------------------------------------------------------

_INPUT_MESSAGES = "gen_ai.input.messages"
_OUTPUT_MESSAGES = "gen_ai.output.messages"
_TOOL_PARAMETERS = ("model_request_parameters",)
_CHAT = (_INPUT_MESSAGES, _OUTPUT_MESSAGES, *_TOOL_PARAMETERS)
_UNREAD = ("llm.input_messages.", "llm.output_messages.", "llm.tools.")
"""OpenInference's flattened copies of a model call's messages and tool definitions, ~20
attributes a call, half the span: MLflow reads none of them (its chat view reads
``mlflow.spanInputs``/``mlflow.spanOutputs``, its translation ``openinference.span.kind``,
``input.value``, ``output.value``, ``llm.token_count.*``, ``llm.model_name``, ``llm.provider``),
and the messages and tool definitions stay in pydantic-ai's own ``gen_ai.*`` attributes."""


def _openinference(span: ReadableSpan, attributes: dict[str, AttributeValue], *, chat: bool) -> ReadableSpan:
    """OpenInference's attributes added to ``attributes``, without those in ``_UNREAD``; returns
    the copy of ``span`` it rewrote (its status is OpenInference's).

    It is not shown what it would only turn into them: the tool definitions (it reads
    ``model_request_parameters`` for nothing else), and, when ``_conversation`` replaces the
    call's inputs and outputs for MLflow (``chat``), the messages, from which it would make
    only those and ``input.value``/``output.value``, which MLflow reads only when a span has
    no ``mlflow.spanInputs``/``mlflow.spanOutputs``."""
    hidden = _CHAT if chat else _TOOL_PARAMETERS
    copy = copy_span(span, {key: value for key, value in attributes.items() if key not in hidden})
    _processor.on_end(copy)
    for key, value in (copy.attributes or {}).items():
        if not key.startswith(_UNREAD):
            attributes[key] = value
    return copy


def _agent_prompt(attributes: dict[str, AttributeValue]) -> None:
    """An agent run's input (the trace's Request when the run is the root) is its prompt with
    its attachments named: OpenInference keeps only the prompt's first text."""
    prompt = last_prompt(attributes.get("pydantic_ai.all_messages"))
    if prompt is not None:
        attributes["input.value"] = prompt


_SPAN_KIND = "openinference.span.kind"
SPAN_TYPE = "mlflow.spanType"
_TYPES = frozenset({_SPAN_KIND, SPAN_TYPE})
"""Never redacted: a word of a fixed list (AGENT, LLM, TOOL...) that holds no secret, and without
which MLflow knows no span's type (a user rule that matches any word would blank them)."""


def _span_type(attributes: dict[str, AttributeValue]) -> None:
    """The type MLflow shows for the span (OpenInference's kind: AGENT, LLM, TOOL, CHAIN...),
    also where MLflow searches it: its ingest fills a span's ``type`` column only from
    ``mlflow.spanType``, so without it ``span.type = 'LLM'`` finds nothing. A plain string: the
    column takes the value as sent (JSON-quoted, as MLflow's client writes attributes, no
    search matches it), and MLflow reads a value that is not JSON as it is."""
    kind = attributes.get(_SPAN_KIND)
    if isinstance(kind, str) and kind:
        attributes.setdefault(SPAN_TYPE, kind)


_INTERRUPTIONS = ("CancelledError", "KeyboardInterrupt", "SystemExit")


def _explained(span: ReadableSpan) -> ReadableSpan:
    """An ERROR span says why in its status, where MLflow shows it: pydantic-ai leaves a
    failed tool's status (ModelRetry, a cancelled tool, UserError) without a message and
    records the exception only as an event. ``ToolRetryError: <the retry's text>``, as
    MLflow's autolog says it; ``interrupted: CancelledError`` for a tool cut off."""
    if span.status.status_code is not StatusCode.ERROR or span.status.description:
        return span
    event = next((event for event in reversed(span.events) if event.name == "exception"), None)
    attributes = (event.attributes or {}) if event is not None else {}
    kind = str(attributes.get("exception.type", "")).rpartition(".")[2]
    if not kind:
        return span
    message = attributes.get("exception.message")
    why = f"interrupted: {kind}" if kind in _INTERRUPTIONS else f"{kind}: {message}" if message else kind
    return copy_span(span, dict(span.attributes or {}), status=Status(StatusCode.ERROR, why))


# -- conversations -------------------------------------------------------------------------

def _conversation(attributes: dict[str, AttributeValue], messages: Any, outputs: Any) -> None:
    """An LLM span's inputs become the whole conversation it was sent (``messages``,
    pydantic-ai's ``gen_ai.input.messages`` parsed), and its outputs the model's answer
    (``outputs``), shaped for MLflow's chat view (see ``_chat``) with the system
    instructions as the first message: pydantic-ai keeps them outside its message list.
    OpenInference left only the last user prompt there."""
    if not isinstance(messages, list):
        return
    instructions = _json(attributes.get("gen_ai.system_instructions"))
    if isinstance(instructions, list) and instructions:
        messages = [{"role": "system", "parts": instructions}, *messages]
    attributes[SPAN_INPUTS] = json.dumps(_chat(messages), ensure_ascii=False)
    if isinstance(outputs, list):
        attributes[SPAN_OUTPUTS] = json.dumps(_chat(outputs), ensure_ascii=False)


def _chat(messages: list[Any]) -> list[Any]:
    """pydantic-ai's OTel GenAI messages as MLflow's chat view renders them.

    The view (MLflow 3.17's JS) turns a message into at most one tool result,
    the last, and none when the message also has text; pydantic-ai sends the
    results of parallel tool calls, and a retry prompt beside them, in one
    message. So every tool result becomes a message of its own, role ``tool``,
    in place. The view reads a result under ``response`` (pydantic-ai writes
    ``result``), and shows the whole list as a YAML dump if any part is not
    text, tool call or tool result: thinking, images and files become text
    parts that say what they were, never their bytes."""
    chat: list[Any] = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("parts"), list):
            chat.append(message)
            continue
        others: list[Any] = []
        for part in message["parts"]:
            if isinstance(part, dict) and part.get("type") == "tool_call_response":
                if others:
                    chat.append({**message, "parts": others})
                    others = []
                response = {key: value for key, value in part.items() if key != "result"}
                response["response"] = part.get("result", _WITHHELD)
                chat.append({"role": "tool", "parts": [response]})
            else:
                others.append(_shown(part))
        if others:
            chat.append({**message, "parts": others})
    return chat


_WITHHELD = "[content not exported]"
"""What the chat view shows for a text pydantic-ai did not record (include_content false)."""


def _shown(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    kind = part.get("type")
    if kind == "text":
        return part if isinstance(part.get("content"), str) else {**part, "content": _WITHHELD}
    if kind == "tool_call":
        arguments = part.get("arguments")
        # Streamed calls carry their arguments as the JSON text the model sent.
        parsed = _json(arguments) if isinstance(arguments, str) else None
        return part if parsed is None else {**part, "arguments": parsed}
    if kind == "thinking":
        return {"type": "text", "content": f"[thinking] {part.get('content', _WITHHELD)}"}
    return {"type": "text", "content": attachment(part)}


def _json(value: AttributeValue | None) -> Any:
    if not isinstance(value, str):
        return None
    try:
        return json.loads(nesting_bounded(value))
    except ValueError:
        return None


# -- nesting -------------------------------------------------------------------------------

MAX_NESTING = 24
"""Deepest JSON nesting (arrays and objects) MLflow's copy holds. A model can send tool
arguments thousands of levels deep: Python's json raises RecursionError at about a thousand,
and well before that MLflow (3.17) stores a trace it cannot read back: a span's inputs or
outputs 32 objects deep pass protobuf's bound of 100 levels (an object is three) when MLflow
converts the trace, and every search of the experiment that would list it fails. 24 leaves
room for what wraps a value on its way (a message list, MLflow's translation)."""
NESTING_CUT = f"[nested deeper than {MAX_NESTING} levels: not exported]"
"""What stands, as a JSON string, for a value cut at ``MAX_NESTING``."""
_CUT_JSON = json.dumps(NESTING_CUT)

_JSON_SPACE = " \t\n\r"
_MAY_OPEN = "[{" + _JSON_SPACE
"""A JSON array or object starts with one of these (or is empty)."""
_ESCAPE = re.compile(r"\\.", re.DOTALL)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_TOKEN = re.compile(r'\\.|"|[\[\]{}]', re.DOTALL)


def nesting_bounded(text: str) -> str:
    """``text``, or when it is JSON nested deeper than ``MAX_NESTING``, the same text with
    each array or object below that depth replaced by ``NESTING_CUT`` (valid JSON stays
    valid). It never parses, so never recurses: a text of any depth costs a few scans at
    C speed, most texts one count (fewer brackets than the bound)."""
    if text.lstrip(_JSON_SPACE)[:1] not in ("[", "{") or text.count("[") + text.count("{") <= MAX_NESTING:
        return text
    # Escapes first (a quote or bracket after a backslash is text), then strings: brackets remain.
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", _ESCAPE.sub("", text)))
    if max(accumulate(map(_STEP.__getitem__, brackets)), default=0) <= MAX_NESTING:
        return text
    return _cut(text)


def _cut(text: str) -> str:
    parts: list[str] = []
    depth, start, kept_from, in_string = 0, 0, 0, False
    for token in _TOKEN.finditer(text):
        mark = token[0]
        if mark == '"':
            in_string = not in_string
        if in_string or mark[0] in '"\\':
            continue
        if mark in "[{":
            depth += 1
            if depth == MAX_NESTING + 1:
                start = token.start()
        elif depth > 0:
            depth -= 1
            if depth == MAX_NESTING:
                parts += (text[kept_from:start], _CUT_JSON)
                kept_from = token.end()
    if depth > MAX_NESTING:  # never closed: cut to the end
        parts += (text[kept_from:start], _CUT_JSON)
        kept_from = len(text)
    return "".join(parts) + text[kept_from:]


def _bound_nesting(attributes: dict[str, AttributeValue]) -> None:
    """Every JSON text MLflow gets within ``MAX_NESTING``: what pydantic-ai and OpenInference
    wrote (tool arguments, results, messages), and what was parsed and written here."""
    for key, value in attributes.items():
        # Inline, the cheapest test first: this runs on every value of every span.
        if (isinstance(value, str) and value[:1] in _MAY_OPEN
                and value.count("[") + value.count("{") > MAX_NESTING):
            attributes[key] = nesting_bounded(value)


_PROMPT_TOKENS = "llm.token_count.prompt"
_COMPLETION_TOKENS = "llm.token_count.completion"
_TOTAL_TOKENS = "llm.token_count.total"


def _token_total(attributes: dict[str, AttributeValue]) -> None:
    """Every model call's token counts add up. pydantic-ai leaves out a zero
    count (a streamed call's first response reports input tokens only), and
    OpenInference then writes no total; MLflow sums per-span totals into the
    trace's, which came out below the trace's input tokens."""
    prompt = attributes.get(_PROMPT_TOKENS)
    completion = attributes.get(_COMPLETION_TOKENS)
    if not isinstance(prompt, int) and not isinstance(completion, int):
        return
    prompt = attributes[_PROMPT_TOKENS] = prompt if isinstance(prompt, int) else 0
    completion = attributes[_COMPLETION_TOKENS] = completion if isinstance(completion, int) else 0
    attributes.setdefault(_TOTAL_TOKENS, prompt + completion)


# -- trace metadata ------------------------------------------------------------------------

def _metadata(attributes: dict[str, AttributeValue], settings: Settings, *, is_root: bool) -> None:
    """Session and user on every span (MLflow takes them from whichever span of
    a trace it stores first); tags and the name on the root span, where MLflow
    reads ``mlflow.traceTag.*``."""
    if settings.session_id:
        attributes["session.id"] = settings.session_id
    if settings.user_id:
        attributes["user.id"] = settings.user_id
    if not is_root:
        return
    for key, value in settings.tags.items():
        attributes[TRACE_TAG + key] = value
    name = settings.trace_name or attributes.get("gen_ai.agent.name")
    if isinstance(name, str) and name:
        attributes[TRACE_NAME_TAG] = name


# -- privacy -------------------------------------------------------------------------------

def _withhold_content(attributes: dict[str, AttributeValue]) -> None:
    """With include_content false pydantic-ai records no text; this drops what a
    future pydantic-ai or OpenInference might still add, by name."""
    for key in list(attributes):
        if key in _CONTENT_ATTRIBUTES or key.endswith(_CONTENT_SUFFIXES):
            del attributes[key]
    for key in (*_MESSAGE_ATTRIBUTES, SPAN_INPUTS, SPAN_OUTPUTS):
        _rewrite_parts(attributes, key, _without_text)


def _without_text(part: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in part.items() if key not in _CONTENT_KEYS}


def _bound_binary(attributes: dict[str, AttributeValue], limit: int) -> None:
    """Inline images and audio past ``limit`` bytes are replaced by their size."""

    def bounded(part: dict[str, Any]) -> dict[str, Any]:
        content = part.get("content")
        if part.get("type") not in ("blob", "binary") or not isinstance(content, str):
            return part
        size = base64_size(content)
        if size <= limit:
            return part
        return {**part, "content": f"[{size} bytes not exported: over max_binary_bytes={limit}]"}

    for key in (*_MESSAGE_ATTRIBUTES, SPAN_INPUTS, SPAN_OUTPUTS):
        value = attributes.get(key)
        # Parsing every message list of every span to find none was most of this work.
        if isinstance(value, str) and ('"blob"' in value or '"binary"' in value):
            _rewrite_parts(attributes, key, bounded)
    for key, value in attributes.items():
        if isinstance(value, str) and value.startswith("data:") and len(value) * 3 // 4 > limit:
            attributes[key] = f"[data URL of {len(value)} characters not exported]"


def _rewrite_parts(attributes: dict[str, AttributeValue], key: str,
                   change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Apply ``change`` to every message part (and instruction) in a JSON attribute."""
    items = _json(attributes.get(key))
    if not isinstance(items, list):
        return

    def one(item: Any) -> Any:
        if isinstance(item, dict) and isinstance(item.get("parts"), list):
            return {**item, "parts": [one(part) for part in item["parts"]]}
        return change(item) if isinstance(item, dict) else item

    changed = [one(item) for item in items]
    if changed != items:
        attributes[key] = json.dumps(changed, ensure_ascii=False)


def _texts(span: ReadableSpan, attributes: Mapping[str, AttributeValue]) -> Iterator[str]:
    """Every text of the copy MLflow gets that redaction looks at, but its resource's."""
    yield span.name
    if span.status.description:
        yield span.status.description
    for event in span.events:
        yield event.name
        yield from _strings(event.attributes or {})
    yield from _strings(attributes)


def _strings(attributes: Mapping[str, AttributeValue]) -> Iterator[str]:
    for value in attributes.values():
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (item for item in value if isinstance(item, str))


def _redact_value(value: AttributeValue, text: Callable[[str], str]) -> AttributeValue:
    if isinstance(value, str):
        return text(value)
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
        return tuple(text(item) for item in value if isinstance(item, str))
    return value


def _redact_attributes(attributes: Mapping[str, AttributeValue] | None,
                       text: Callable[[str], str]) -> dict[str, AttributeValue]:
    return {key: _redact_value(value, text) for key, value in (attributes or {}).items()}


def _redacted_resource(resource: Resource, config: _Config) -> Resource:
    """One redacted copy per resource (a process has one or two)."""
    cached = config.resources.get(id(resource))
    if cached is not None and cached[0] is resource:
        return cached[1]
    redacted = Resource(_redact_attributes(resource.attributes, config.redactor.redact), resource.schema_url)
    config.resources[id(resource)] = (resource, redacted)
    return redacted
