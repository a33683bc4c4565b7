"""The benchmark harness must keep working: its --quick smoke run exits 0 and
prints the table with all six sections (the figures themselves are not checked:
they are the full run's business, by hand), and a run's report, written to a
file, carries the conditions the script took itself."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from conftest import clean_env

REPO = Path(__file__).resolve().parent.parent
RUN_PY = REPO / "benchmarks" / "run.py"
HEADER = "| # | Measure | Variant | Median | Min-Max | vs baseline | Target | Result |"
ROW = re.compile(r"^\| (\d) \|", flags=re.MULTILINE)


def _bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(RUN_PY), *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout


@pytest.mark.e2e  # the harness starts its own MLflow server
def test_quick_benchmark_runs_and_prints_every_section(tmp_path: Path) -> None:
    out = tmp_path / "quick.md"
    done = _bench("--quick", "--out", str(out), timeout=900)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    assert HEADER in done.stdout
    sections = {int(m) for m in ROW.findall(done.stdout)}
    assert sections == {1, 2, 3, 4, 5, 6}, done.stdout
    rows = [line for line in done.stdout.splitlines() if ROW.match(line)]
    assert all(line.rstrip().endswith(("| PASS |", "| **MISS** |", "| — |")) for line in rows), rows
    assert "## Failures" not in done.stdout
    assert out.read_text(encoding="utf-8").strip() == done.stdout.strip()
    assert "sections 1, 2, 3, 4, 5 and 6 (--quick smoke run" in done.stdout.splitlines()[0]


def test_a_tiny_run_writes_its_table_and_the_conditions_it_took_itself(tmp_path: Path) -> None:
    out = tmp_path / "run.md"
    before = datetime.now(timezone.utc)
    done = _bench("--only", "1", "--reps", "1", "--out", str(out), timeout=300)
    after = datetime.now(timezone.utc)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"
    written = out.read_text(encoding="utf-8")
    assert written.strip() == done.stdout.strip()

    commit = _git("rev-parse", "--short", "HEAD").strip()
    dirty = bool(_git("status", "--porcelain").strip())
    heading = re.fullmatch(rf"### Run of (\d{{4}}-\d\d-\d\d \d\d:\d\d) UTC at {commit}( \(dirty\))?: "
                           r"section 1", written.splitlines()[0])
    assert heading, written.splitlines()[0]
    started = datetime.strptime(heading[1], "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc)
    assert before - timedelta(minutes=1) <= started <= after
    assert bool(heading[2]) == dirty
    command = shlex.join([sys.executable, str(RUN_PY), "--only", "1", "--reps", "1", "--out", str(out)])
    assert f"- command: `{command}`" in written
    assert f"- traced-run source: commit {commit}, {'dirty (uncommitted changes in ' if dirty else 'clean'}" \
        in written
    assert re.search(r"^- written by `benchmarks/run.py`, not by hand; started "
                     r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, wall time of the run \d+ s$",
                     written, flags=re.MULTILINE), written
    cpuinfo = Path("/proc/cpuinfo")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.MULTILINE) \
        if cpuinfo.exists() else None
    # x86's name for it; other kernels' names are the unit tests' (tests/unit/test_bench_artifact.py)
    assert f"; {os.cpu_count()} cores; CPU {model[1].strip() if model else ''}" in written
    load = r"\d+\.\d\d / \d+\.\d\d / \d+\.\d\d"
    assert re.search(rf"^- load average \(1/5/15 min\): at start {load}; at end {load}$", written,
                     flags=re.MULTILINE), written
    versions = ", ".join(f"{dist} {importlib.metadata.version(dist)}"
                         for dist in ("pydantic-ai-slim", "mlflow", "opentelemetry-sdk"))
    python = f"Python {platform.python_version()} ({sys.executable})"
    assert f"- versions: {python}, {versions}, traced-run " in written

    assert HEADER in written
    rows = [line for line in written.splitlines() if ROW.match(line)]
    variants = [line.split(" | ")[2] for line in rows]
    assert variants == ["bare", "env-only bootstrap", "traced-run", "opentelemetry-instrument"], rows


def test_a_smoke_run_cannot_be_published() -> None:
    done = _bench("--quick", "--publish", timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].endswith(
        "error: --publish takes a measurement, not a --quick smoke run")
