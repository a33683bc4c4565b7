"""README's first command: the quickstart starts its own MLflow, runs the
example agent under traced-run and prints where the trace is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clean_env

pytestmark = pytest.mark.e2e  # the quickstart starts its own MLflow server

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_shows_the_trace_and_its_spans() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert '{"forecast":"a: sunny, 21 C"}' in out
    assert "is in experiment 'quickstart'" in out
    assert "/#/experiments/" in out and "selectedEvaluationId=tr-" in out
    for span in ("'invoke_agent weather' AGENT", "'execute_tool forecast' TOOL", "'chat test' LLM"):
        assert span in out
    assert "traced-run:" not in done.stderr
