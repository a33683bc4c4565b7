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
from collections.abc import Callable, Mapping
from typing import Any

from openinference.instrumentation.pydantic_ai import OpenInferenceSpanProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import Status
from opentelemetry.util.types import AttributeValue

from traced_run.redact import DEFAULT_RULES, Redactor, Rule
from traced_run.settings import Settings

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
    copy = _copy(span, dict(span.attributes or {}))
    _processor.on_end(copy)
    attributes: dict[str, AttributeValue] = dict(copy.attributes or {})
    _conversation(attributes)
    _metadata(attributes, settings, is_root=span.parent is None)
    if not settings.include_content:
        _withhold_content(attributes)
    _bound_binary(attributes, settings.max_binary_bytes)
    redactor = config.redactor
    if not redactor:
        return _copy(copy, attributes)
    text = redactor.redact
    return _copy(
        copy,
        {key: _redact_value(value, text) for key, value in attributes.items()},
        name=text(copy.name),
        events=[Event(text(event.name), _redact_attributes(event.attributes, text), event.timestamp)
                for event in copy.events],
        status=Status(copy.status.status_code, text(copy.status.description))
        if copy.status.description else copy.status,
        resource=_redacted_resource(copy.resource, config),
    )


def _copy(span: ReadableSpan, attributes: dict[str, AttributeValue], **changed: Any) -> ReadableSpan:
    fields: dict[str, Any] = dict(
        name=span.name, context=span.context, parent=span.parent, resource=span.resource,
        attributes=attributes, events=span.events, links=span.links, kind=span.kind, status=span.status,
        start_time=span.start_time, end_time=span.end_time, instrumentation_scope=span.instrumentation_scope,
    )
    fields.update(changed)
    return ReadableSpan(**fields)


# -- conversations -------------------------------------------------------------------------

def _conversation(attributes: dict[str, AttributeValue]) -> None:
    """An LLM span's inputs become the whole conversation it was sent, in the
    OTel GenAI message shape MLflow's chat view reads: system instructions as
    the first message, tool results under ``response`` (pydantic-ai writes
    ``result``, which the view does not read). OpenInference left only the
    last user prompt there."""
    messages = _json(attributes.get("gen_ai.input.messages"))
    if not isinstance(messages, list):
        return
    instructions = _json(attributes.get("gen_ai.system_instructions"))
    conversation: list[Any] = []
    if isinstance(instructions, list) and instructions:
        conversation.append({"role": "system", "parts": instructions})
    conversation.extend(_with_responses(message) for message in messages)
    attributes[SPAN_INPUTS] = json.dumps(conversation, ensure_ascii=False)
    outputs = _json(attributes.get("gen_ai.output.messages"))
    if isinstance(outputs, list):
        attributes[SPAN_OUTPUTS] = json.dumps(outputs, ensure_ascii=False)


def _with_responses(message: Any) -> Any:
    if not isinstance(message, dict) or not isinstance(message.get("parts"), list):
        return message
    parts = []
    for part in message["parts"]:
        if isinstance(part, dict) and part.get("type") == "tool_call_response" and "result" in part:
            part = {("response" if key == "result" else key): value for key, value in part.items()}
        parts.append(part)
    return {**message, "parts": parts}


def _json(value: AttributeValue | None) -> Any:
    if not isinstance(value, str):
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None


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
        size = len(content) * 3 // 4 - content[-2:].count("=")  # base64
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
