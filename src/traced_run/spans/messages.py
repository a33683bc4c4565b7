"""pydantic-ai's OTel GenAI message parts as a person reads them: an attachment
(an image, audio, a document, a file) is named by its kind and size, or by where
it is, never by its bytes, in the chat view and in the trace's Request alike."""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.util.types import AttributeValue

_NOT_THE_PROMPT = ("tool_call", "tool_call_response", "thinking")
"""Parts of a user message that are not what the user sent (pydantic-ai puts tool results there)."""


def base64_size(content: str) -> int:
    return len(content) * 3 // 4 - content[-2:].count("=")


def attachment(part: dict[str, Any]) -> str:
    """What a part that is neither text nor a tool call is: ``[image/png, 270448 bytes]``,
    ``[image/png: https://...]``, or its kind alone when pydantic-ai recorded neither."""
    kind = part.get("type")
    what = next((str(part[key]) for key in ("mime_type", "media_type", "modality") if part.get(key)), kind)
    content = part.get("content")
    if kind in ("blob", "binary") and isinstance(content, str):
        return f"[{what}, {base64_size(content)} bytes]"
    where = part.get("uri") or part.get("url") or part.get("file_id")
    return f"[{what}: {where}]" if isinstance(where, str) else f"[{what}]"


def last_prompt(messages: AttributeValue | None) -> str | None:
    """The last user message of a JSON message list (the run's prompt: earlier ones are its
    history), its texts and its attachments named, one a line, in the order they were sent."""
    if not isinstance(messages, str):
        return None
    try:
        parsed: Any = json.loads(messages)
    except ValueError:
        return None
    for message in reversed(parsed if isinstance(parsed, list) else []):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        lines = [_line(part) for part in message.get("parts") or ()
                 if isinstance(part, dict) and part.get("type") not in _NOT_THE_PROMPT]
        text = "\n".join(line for line in lines if line)
        if text:
            return text
    return None


def _line(part: dict[str, Any]) -> str | None:
    if part.get("type") != "text":
        return attachment(part)
    content = part.get("content")
    return content if isinstance(content, str) else None
