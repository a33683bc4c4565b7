"""A fuzz of the settings loader (issue 16): random YAML documents, random
environment values and launcher options, some well-formed, most not, with a
secret planted where secrets go (password, token, header values, a URL's
credentials, a ``${VAR}`` those reference).

Whatever the input, the loader either gives settings or raises one ConfigError
line; nothing else escapes it, no secret is in its message or in what ``traced-run
config`` prints (tests/test_settings_fuzz_launched.py: the same through the launcher).
Seeded, so a failure names the case that reproduces it; a fixed number of cases, so
the outcome does not depend on how fast the machine is that day."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.fuzz import SECRET, case

from traced_run.config.settings import SPECS
from traced_run.config.sources import load, shown
from traced_run.report import ConfigError

IN_PROCESS_CASES = 400
"""About a second here (1233-1685 cases ran in 3 s at load average 5)."""


def test_the_loader_gives_settings_or_one_line_and_never_a_secret(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    outcomes = {"settings": 0, "refused": 0}
    for index in range(IN_PROCESS_CASES):
        data, env = case(index, tmp_path)
        where = f"case {index}: {data[:300]!r} {env!r}"
        try:
            loaded = load(env)
        except ConfigError as error:
            message = str(error)
            assert message and "\n" not in message and "\r" not in message, where
            assert SECRET not in message, f"{where}\n{message}"
            assert len(message) < 1200, where
            outcomes["refused"] += 1
        else:
            printed = "\n".join([*(shown(name, getattr(loaded.settings, name)) for name in SPECS),
                                 *loaded.notes])
            assert SECRET not in printed, f"{where}\n{printed}"
            assert all("\n" not in note for note in loaded.notes), where
            outcomes["settings"] += 1
    assert outcomes["settings"] and outcomes["refused"], outcomes


