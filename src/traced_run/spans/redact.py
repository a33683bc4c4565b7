"""Replaces secrets in exported text with a marker.

Rules are regular expressions: a rule with a capturing group replaces only its
first group (``Bearer <token>`` keeps ``Bearer``), one without replaces the
whole match. The default rules catch the secrets that end up in prompts, tool
arguments and error messages most often; they err towards redacting.

Every rule runs on RE2 (``config.settings.redaction_pattern``): one search
takes time linear in the text whatever the pattern, and RE2 lets go of the
GIL while it searches, so the app's threads run on meanwhile. Python's ``re``
held the GIL for a whole match, and the URL rule was quadratic on a prompt
such as ``"://" + "a-" * 20000``: a user of the app could stall it with one
prompt. What linear search does not bound is kept short by ``MAX_SCREENED``,
``SCREEN_SECONDS`` and, on the exit path, ``until``: a text past one of them
is replaced by a placeholder that says so.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from traced_run.config.settings import redaction_pattern


@dataclass(frozen=True)
class Rule:
    pattern: str
    """A regular expression in RE2's syntax; its first group, if any, is what gets replaced."""
    needles: tuple[str, ...] = ()
    """Lower-case literals one of which every match contains. A text holding
    none of them is not scanned: scanning every attribute of every span with
    every rule cost more than the rest of the export together, while a
    substring test is nearly free. Empty (a user's rule) means always scan."""


_SPACE = r"\s\v\x1c-\x1f\x85\p{Z}"
"""What Python's ``str.isspace`` calls white space, for inside ``[]``: RE2's ``\\s`` is ASCII
only, and a no-break space after ``Bearer`` must still end the word before the token."""

DEFAULT_RULES: tuple[Rule, ...] = (
    # Authorization headers and the like.
    Rule(r"(?i)\bbearer[" + _SPACE + r"]+([A-Za-z0-9\-._~+/]{8,}=*)", ("bearer",)),
    # OpenAI/Anthropic-style keys (sk-..., sk-proj-..., sk-ant-...), and their pk-/rk- kin.
    Rule(r"\b((?:sk|pk|rk)-[A-Za-z0-9_\-]{16,})", ("sk-", "pk-", "rk-")),
    Rule(r"\b(AKIA[0-9A-Z]{16})\b", ("akia",)),  # AWS access key id
    Rule(r"\b((?:gh[pousr]_|github_pat_)[A-Za-z0-9_]{30,})",  # GitHub tokens
         ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    Rule(r"\b(xox[abprs]-[A-Za-z0-9\-]{10,})", ("xox",)),  # Slack tokens
    Rule(r"\b(AIza[0-9A-Za-z\-_]{35})", ("aiza",)),  # Google API keys
    # The password of user:password@host in any URL.
    Rule(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^/" + _SPACE + r":@\"']*:([^/" + _SPACE + r"@\"']+)@", ("://",)),
    # key=value and "key": "value" for names that say secret.
    Rule(r"(?i)\b(?:api[_-]?key|secret|password|passwd|pwd|token|access[_-]?token|client[_-]?secret)\b"
         # The value is a plain word: a JSON object or list after the name (a tool's schema) is left as is.
         r"[\"']?[" + _SPACE + r"]*[:=][" + _SPACE + r"]*[\"']?([^" + _SPACE + r"\"',;&{}\[\]]+)",
         ("api", "secret", "passw", "pwd", "token")),
)


REMEMBERED_MIN = 32
"""Shorter texts (ids, names, numbers) are screened each time: most are seen once."""
REMEMBERED_CHARS = 1 << 22
"""Characters of clean texts remembered at most (4 Mi); past it, forgotten all at once."""

MAX_SCREENED = 1 << 22
"""Characters (4 Mi) of one text the rules scan at most. A longer text that a rule would have
to scan (it holds a default rule's literal, or there are rules of the user's) is not exported:
one search cannot be stopped halfway, and one whose DFA runs out of memory goes on many times
slower (still linear)."""
SCREEN_SECONDS = 0.5
"""CPU seconds (of the thread redacting) the rules may take on one text; past them the text is
not exported. Each search is linear, but a rule of the user's such as ``a+b|a`` searches to the
text's end for every match: quadratic in all. Default rules take milliseconds on MAX_SCREENED."""


class _Unscreened(Exception):
    """A text's bound ran out between two matches: the text is not exported."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


_bound = threading.local()
_LEFT = "the process was leaving, and exit_timeout ran out before redaction"


@contextmanager
def until(deadline: float) -> Iterator[None]:
    """Redaction on this thread ends by ``deadline`` (``time.monotonic()``): the exit path's
    bound. Past it, a text a rule would have to scan is not exported."""
    _bound.deadline = deadline
    try:
        yield
    finally:
        _bound.deadline = None


class Redactor:
    """Applies a fixed list of rules; ``redact`` is safe to call from any thread."""

    def __init__(self, rules: Iterable[Rule], marker: str) -> None:
        self._rules = [(redaction_pattern(rule.pattern), rule.needles) for rule in rules]
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
        if not rules:
            return text
        try:
            if len(text) > MAX_SCREENED:
                raise _Unscreened(f"redaction screens at most {MAX_SCREENED}")
            try:
                return self._scanned(text, lowered, rules)
            # A lone surrogate (a file name as os.listdir gives it): RE2 reads UTF-8 only.
            except UnicodeEncodeError:
                well_formed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
                return self._scanned(well_formed, well_formed.lower(), rules)
        except _Unscreened as unscreened:
            return f"[{len(text)} characters not exported: {unscreened.why}]"

    def _scanned(self, text: str, lowered: str, rules: list[tuple[Any, tuple[str, ...]]]) -> str:
        deadline: float | None = getattr(_bound, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise _Unscreened(_LEFT)
        budget: list[float] = []
        """When this thread's CPU time for the text runs out; set at the first match, before which
        only one search ran, in linear time (most texts have no match: the clock is not read)."""

        def replace(match: Any) -> str:
            used = time.thread_time()
            if not budget:
                budget.append(used + SCREEN_SECONDS)
            elif used > budget[0]:
                raise _Unscreened(f"redaction took longer than its {SCREEN_SECONDS:g} s")
            if deadline is not None and time.monotonic() > deadline:
                raise _Unscreened(_LEFT)
            return self._replace(match)

        for rule, needles in rules:
            # google-re2's search costs a third less than its sub, and most texts hold no match.
            if (needles and not any(needle in lowered for needle in needles)) or rule.search(text) is None:
                continue
            changed = rule.sub(replace, text)
            if changed != text:
                text, lowered = changed, changed.lower()
        return text

    def _replace(self, match: Any) -> str:
        if match.re.groups == 0 or match.start(1) < 0:
            return self._marker
        whole: str = match.group(0)
        start, end = match.start(1) - match.start(0), match.end(1) - match.start(0)
        before = whole[:start]
        # A bare JSON value (``"token": 123``) becomes a JSON string, so the text stays valid JSON.
        marker = json.dumps(self._marker) if _after_json_key(before) else self._marker
        return before + marker + whole[end:]


def _after_json_key(before: str) -> bool:
    """Whether ``before`` ends as the text before an unquoted JSON value does: a key's closing
    quote, then the colon."""
    head = before.rstrip()
    return head.endswith(":") and head[:-1].rstrip().endswith('"')
