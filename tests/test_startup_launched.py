"""The start-up rule in real interpreters: a traced interpreter that has not imported
pydantic_ai has loaded nothing beyond a bare interpreter's modules but our
``sitecustomize``, ``traced_run``, its ``bootstrap`` and ``flags``; under the shell
launcher, ``traced_run.startcheck`` too and, for plain values, nothing else
(tests/unit/test_startup.py holds the in-process half)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TRACED_RUN, clean_env

LOADED = "import sys, json; print(json.dumps(sorted(sys.modules)))"


ALLOWED = {"sitecustomize", "traced_run", "traced_run.bootstrap", "traced_run.flags"}


def _modules(env: dict[str, str]) -> set[str]:
    return set(json.loads(subprocess.check_output([sys.executable, "-c", LOADED], env=env, timeout=60)))


def test_the_bootstrap_loads_nothing_a_bare_interpreter_has_not() -> None:
    boot = subprocess.check_output([sys.executable, "-m", "traced_run", "--print-pythonpath"],
                                   env=clean_env(), text=True, timeout=60).strip()
    bare = _modules(clean_env())
    traced = _modules(clean_env(PYTHONPATH=boot, MLFLOW_TRACKING_URI="http://127.0.0.1:9"))
    assert traced - bare == ALLOWED
    switched_off = _modules(clean_env(PYTHONPATH=boot, TRACED_RUN_ENABLED="false"))
    assert switched_off - bare <= ALLOWED


HEAVY = {"argparse", "dataclasses", "inspect", "typing", "re", "json", "yaml", "urllib.parse",
         "traced_run.config.settings", "traced_run.config.sources"}
"""What the launcher's check must not import for plain settings: most of a bare start-up each."""


LOADED_PLAINLY = "import sys; sys.stdout.write(' '.join(sorted(sys.modules)))"
"""LOADED without json, which imports re."""


def _launched_modules(env: dict[str, str], cwd: Path) -> set[str]:
    return set(subprocess.check_output([TRACED_RUN, "python", "-c", LOADED_PLAINLY], env=env, cwd=cwd,
                                       text=True, timeout=60).split())


def test_under_the_launcher_plain_settings_are_checked_without_the_settings_machinery(tmp_path: Path) -> None:
    env = clean_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9", MLFLOW_EXPERIMENT_NAME="agents",
                    TRACED_RUN_INCLUDE_CONTENT="false")
    loaded = _launched_modules(env, tmp_path)
    assert loaded - _modules(clean_env()) == {*ALLOWED, "traced_run.startcheck"}
    assert not loaded & HEAVY


def test_a_value_outside_the_plain_forms_gets_the_full_check(tmp_path: Path) -> None:
    env = clean_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9", OTEL_EXPORTER_OTLP_TIMEOUT="5")
    assert "traced_run.config.sources" in _launched_modules(env, tmp_path)
