"""The benchmark harness must keep working: its --quick smoke run exits 0 and
prints the table with all six sections (the figures themselves are not checked:
they are the full run's business, by hand)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env

pytestmark = pytest.mark.e2e  # the harness starts its own MLflow server

REPO = Path(__file__).resolve().parent.parent
HEADER = "| # | Measure | Variant | Median | Min-Max | vs baseline | Target | Result |"


def test_quick_benchmark_runs_and_prints_every_section() -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick"], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    assert HEADER in done.stdout
    sections = {int(m) for m in re.findall(r"^\| (\d) \|", done.stdout, flags=re.MULTILINE)}
    assert sections == {1, 2, 3, 4, 5, 6}, done.stdout
    rows = [line for line in done.stdout.splitlines() if re.match(r"^\| \d \|", line)]
    assert all(line.rstrip().endswith(("| PASS |", "| **MISS** |", "| — |")) for line in rows), rows
    assert "## Failures" not in done.stdout
