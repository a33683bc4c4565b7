"""The start-up rule, asserted: a traced interpreter that has not imported
pydantic_ai has loaded nothing beyond a bare interpreter's modules but our
``sitecustomize``, ``traced_run``, its ``bootstrap`` and ``flags`` (each
further import at every interpreter start is time every Python process of a
deployment pays)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import clean_env

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
