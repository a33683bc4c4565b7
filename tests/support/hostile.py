"""Hostile settings shared by the in-process tests (tests/unit/test_settings_security.py)
and those that run the launcher (tests/test_settings_security_launched.py)."""

from __future__ import annotations

from pathlib import Path

SECRET = "hunter2-s3cret"

UNNAMED_MAY_SET = ["service_name", "session_id", "user_id", "tags", "trace_name"]
"""Trace metadata: the only keys that cannot redirect, hang, fill or silence anything."""


def ignored_line(config: Path, line: int, key: str, more: str = "") -> str:
    return (f"{config}:{line}: {key}{more}: a traced-run.yaml found in the working directory, which nobody "
            f"named, may set only {', '.join(UNNAMED_MAY_SET)}; the whole file is ignored; name it "
            "(--config FILE or TRACED_RUN_CONFIG=FILE) if you trust it")


DEEP = "tags: " + "[" * 300 + "]" * 300 + "\n"


NOT_UTF8 = "bad\udcffutf"
"""What Python makes of the byte 0xff in an environment value (a Latin-1 terminal's é is 0xe9)."""
