"""Reading `traced-run doctor`'s output: one line per check, then the summary."""

from __future__ import annotations

import re

LINE = re.compile(r"(OK|WARN|FAIL) ([\w .-]+): (.+)")


def checks(stdout: str) -> dict[str, tuple[str, str]]:
    """``check -> (status, what)``; every line but the summary is a check line."""
    lines = stdout.splitlines()
    assert lines[-1].startswith("-- "), stdout
    found: dict[str, tuple[str, str]] = {}
    for line in lines[:-1]:
        match = LINE.fullmatch(line)
        assert match, line
        found[match[2]] = (match[1], match[3])
    return found
