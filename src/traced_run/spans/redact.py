"""Replaces secrets in exported text with a marker.

Rules are regular expressions: a rule with a capturing group replaces only its
first group (``Bearer <token>`` keeps ``Bearer``), one without replaces the
whole match. The default rules catch the secrets that end up in prompts, tool
arguments and error messages most often; they err towards redacting.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    pattern: str
    """A regular expression; its first group, if any, is what gets replaced."""
    needles: tuple[str, ...] = ()
    """Lower-case literals one of which every match contains. A text holding
    none of them is not scanned: scanning every attribute of every span with
    every rule cost more than the rest of the export together, while a
    substring test is nearly free. Empty (a user's rule) means always scan."""


DEFAULT_RULES: tuple[Rule, ...] = (
    # Authorization headers and the like.
    Rule(r"(?i)\bbearer\s+([A-Za-z0-9\-._~+/]{8,}=*)", ("bearer",)),
    # OpenAI/Anthropic-style keys (sk-..., sk-proj-..., sk-ant-...), and their pk-/rk- kin.
    Rule(r"\b((?:sk|pk|rk)-[A-Za-z0-9_\-]{16,})", ("sk-", "pk-", "rk-")),
    Rule(r"\b(AKIA[0-9A-Z]{16})\b", ("akia",)),  # AWS access key id
    Rule(r"\b((?:gh[pousr]_|github_pat_)[A-Za-z0-9_]{30,})",  # GitHub tokens
         ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    Rule(r"\b(xox[abprs]-[A-Za-z0-9\-]{10,})", ("xox",)),  # Slack tokens
    Rule(r"\b(AIza[0-9A-Za-z\-_]{35})", ("aiza",)),  # Google API keys
    # The password of user:password@host in any URL.
    Rule(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@\"']*:([^/\s@\"']+)@", ("://",)),
    # key=value and "key": "value" for names that say secret.
    Rule(r"(?i)\b(?:api[_-]?key|secret|password|passwd|pwd|token|access[_-]?token|client[_-]?secret)\b"
         # The value is a plain word: a JSON object or list after the name (a tool's schema) is left as is.
         r"[\"']?\s*[:=]\s*[\"']?([^\s\"',;&{}\[\]]+)",
         ("api", "secret", "passw", "pwd", "token")),
)


REMEMBERED_MIN = 32
"""Shorter texts (ids, names, numbers) are screened each time: most are seen once."""
REMEMBERED_CHARS = 1 << 22
"""Characters of clean texts remembered at most (4 Mi); past it, forgotten all at once."""

_JSON_KEY_END = re.compile(r'"\s*:\s*$')
"""What precedes an unquoted JSON value: a key's closing quote and the colon."""


class Redactor:
    """Applies a fixed list of rules; ``redact`` is safe to call from any thread."""

    def __init__(self, rules: Iterable[Rule], marker: str) -> None:
        self._rules = [(re.compile(rule.pattern), rule.needles) for rule in rules]
        self._unscreened = [(rule, needles) for rule, needles in self._rules if not needles]
        self._needles = tuple(dict.fromkeys(needle for _, needles in self._rules for needle in needles))
        self._marker = marker
        self._clean: dict[str, None] = {}
        """Texts ``needed`` found holding no needle (only read and added to: any thread may screen)."""
        self._clean_chars = 0

    def __bool__(self) -> bool:
        return bool(self._rules)

    def needed(self, texts: Iterable[str]) -> bool:
        """Whether ``redact`` may change any of ``texts``. A span's texts are screened
        together, once (nearly every span holds no needle anywhere), and those of them
        already found clean are not screened again: an agent's instructions, tool
        definitions and schemas come back on every model call, and one dictionary look-up
        costs less than one search per needle."""
        if self._unscreened:
            return True
        clean = self._clean
        fresh = [text for text in texts if text not in clean]
        lowered = "\n".join(fresh).lower()  # no needle holds a newline: none is made by joining
        if any(needle in lowered for needle in self._needles):
            return True
        for text in fresh:
            if len(text) >= REMEMBERED_MIN:
                clean[text] = None
                self._clean_chars += len(text)
        if self._clean_chars > REMEMBERED_CHARS:
            self._clean, self._clean_chars = {}, 0
        return False

    def redact(self, text: str) -> str:
        lowered = text.lower()
        # Nearly every text holds no needle at all: one plain loop settles it,
        # and only the rules without needles are left to run.
        rules = self._unscreened
        for needle in self._needles:
            if needle in lowered:
                rules = self._rules
                break
        for rule, needles in rules:
            if needles and not any(needle in lowered for needle in needles):
                continue
            changed = rule.sub(self._replace, text)
            if changed != text:
                text, lowered = changed, changed.lower()
        return text

    def _replace(self, match: re.Match[str]) -> str:
        if match.re.groups == 0 or match.start(1) < 0:
            return self._marker
        whole, start, end = match.group(0), match.start(1) - match.start(0), match.end(1) - match.start(0)
        before = whole[:start]
        # A bare JSON value (``"token": 123``) becomes a JSON string, so the text stays valid JSON.
        marker = json.dumps(self._marker) if _JSON_KEY_END.search(before) else self._marker
        return before + marker + whole[end:]
