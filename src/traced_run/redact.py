"""Replaces secrets in exported text with a marker.

Rules are regular expressions: a rule with a capturing group replaces only its
first group (``Bearer <token>`` keeps ``Bearer``), one without replaces the
whole match. The default rules catch the secrets that end up in prompts, tool
arguments and error messages most often; they err towards redacting.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

DEFAULT_RULES: tuple[str, ...] = (
    # Authorization headers and the like.
    r"(?i)\bbearer\s+([A-Za-z0-9\-._~+/]{8,}=*)",
    # OpenAI/Anthropic-style keys (sk-..., sk-proj-..., sk-ant-...), and their pk-/rk- kin.
    r"\b((?:sk|pk|rk)-[A-Za-z0-9_\-]{16,})",
    r"\b(AKIA[0-9A-Z]{16})\b",  # AWS access key id
    r"\b((?:gh[pousr]_|github_pat_)[A-Za-z0-9_]{30,})",  # GitHub tokens
    r"\b(xox[abprs]-[A-Za-z0-9\-]{10,})",  # Slack tokens
    r"\b(AIza[0-9A-Za-z\-_]{35})",  # Google API keys
    # The password of user:password@host in any URL.
    r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@\"']*:([^/\s@\"']+)@",
    # key=value and "key": "value" for names that say secret.
    r"(?i)\b(?:api[_-]?key|secret|password|passwd|pwd|token|access[_-]?token|client[_-]?secret)\b"
    # The value is a plain word: a JSON object or list after the name (a tool's schema) is left as is.
    r"[\"']?\s*[:=]\s*[\"']?([^\s\"',;&{}\[\]]+)",
)


class Redactor:
    """Applies a fixed list of rules; ``redact`` is safe to call from any thread."""

    def __init__(self, rules: Iterable[str], marker: str) -> None:
        self._rules = [re.compile(rule) for rule in rules]
        self._marker = marker

    def __bool__(self) -> bool:
        return bool(self._rules)

    def redact(self, text: str) -> str:
        for rule in self._rules:
            text = rule.sub(self._replace, text)
        return text

    def _replace(self, match: re.Match[str]) -> str:
        if match.re.groups == 0 or match.start(1) < 0:
            return self._marker
        whole, start, end = match.group(0), match.start(1) - match.start(0), match.end(1) - match.start(0)
        return whole[:start] + self._marker + whole[end:]
