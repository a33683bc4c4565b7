"""The settings fuzz through the launcher (tests/support/fuzz.py makes the cases):
whatever the input, ``traced-run config`` exits 0 or 78 with at most one
``traced-run:`` line, no traceback and no secret in what it prints."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import TRACED_RUN, clean_env
from support.fuzz import SECRET, case

LAUNCHER_CASES = 12


def test_the_launcher_exits_0_or_78_with_at_most_one_line(tmp_path: Path) -> None:
    for index in range(LAUNCHER_CASES):
        data, env = case(index, tmp_path)
        done = subprocess.run([TRACED_RUN, "config"], cwd=tmp_path, env=clean_env(**env), capture_output=True,
                              text=True, errors="replace", timeout=60)
        where = f"case {index}: {data[:300]!r} {env!r}"
        assert done.returncode in (0, 78), f"{where}\n{done.stderr}"
        assert "Traceback" not in done.stderr, where
        lines = done.stderr.splitlines()
        if done.returncode == 78:
            assert len(lines) == 1 and lines[0].startswith("traced-run: "), f"{where}\n{done.stderr}"
        else:  # at most the line that says a ./traced-run.yaml nobody named is ignored
            assert lines == [] or (len(lines) == 1 and "the whole file is ignored" in lines[0]), \
                f"{where}\n{done.stderr}"
        assert SECRET not in done.stdout + done.stderr, f"{where}\n{done.stdout}{done.stderr}"
