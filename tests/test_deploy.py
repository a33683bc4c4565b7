"""The deployment recipes in deploy/, checked where running them is not possible
here (no Docker engine, no cluster, no collector binary): they parse, they set
the variables traced-run reads, and the boot directory they put on PYTHONPATH
is where the wheel installs it."""

from __future__ import annotations

import re
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import yaml
from conftest import TRACED_RUN, clean_env

import traced_run
from traced_run.bootstrap import BOOT_DIR
from traced_run.config.settings import SPECS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KNOWN_ENV = {var for spec in SPECS.values() for var in spec.env + spec.env_off}
"""Every variable traced-run reads: a recipe's typo would be silently ignored."""


def dockerfile_env() -> dict[str, str]:
    """The ENV instruction's key=value pairs (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(pair.split("=", 1) for pair in line[4:].split()))
    return env


def image_python() -> str:
    found = re.search(r"^FROM python:(\d+\.\d+)", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert found, "the Dockerfile starts from an official python image"
    return found[1]


def boot_dir_in_image() -> str:
    """Where ``pip install traced-run`` puts the boot directory in the image: the
    image's purelib (python images install into /usr/local) + the package layout
    that ``traced-run --print-pythonpath`` shows here."""
    printed = subprocess.run([TRACED_RUN, "--print-pythonpath"], capture_output=True, text=True,
                             env=clean_env(), check=True).stdout.strip()
    assert printed == BOOT_DIR
    inside_package = Path(printed).relative_to(Path(traced_run.__file__).resolve().parent.parent)
    assert inside_package == Path("traced_run", "_boot")
    site = sysconfig.get_path("purelib", scheme="posix_prefix",
                              vars={"base": "/usr/local", "py_version_short": image_python()})
    return str(Path(site) / inside_package)


def test_boot_dir_holds_only_the_sitecustomize_the_wheel_ships() -> None:
    assert sorted(p.name for p in Path(BOOT_DIR).iterdir() if p.name != "__pycache__") == ["sitecustomize.py"]


def test_dockerfile_traces_through_env_vars_only() -> None:
    env = dockerfile_env()
    assert env["PYTHONPATH"] == boot_dir_in_image()
    assert env["PYTHONPATH"] == "/usr/local/lib/python3.11/site-packages/traced_run/_boot"
    assert env["MLFLOW_TRACKING_URI"].startswith("http")
    assert env.get("MLFLOW_EXPERIMENT_NAME") or env.get("MLFLOW_EXPERIMENT_ID")
    ours = {k for k in env if k.startswith(("MLFLOW_", "OTEL_", "TRACED_RUN_"))}
    assert ours <= KNOWN_ENV, ours - KNOWN_ENV
    text = (DEPLOY / "Dockerfile").read_text()
    assert "traced-run" in re.search(r"^RUN pip install.*$", text, re.M)[0]  # type: ignore[index]
    cmd = re.search(r"^CMD (.+)$", text, re.M)
    assert cmd and cmd[1].startswith('["python"'), "exec form without the launcher: python is PID 1"


def kubernetes() -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    return {d["kind"]: d for d in documents}


def test_kubernetes_manifest_sets_the_env_of_the_deployment() -> None:
    found = kubernetes()
    assert set(found) == {"ConfigMap", "Deployment"}
    config = found["ConfigMap"]
    assert all(isinstance(v, str) for v in config["data"].values()), "ConfigMap values must be strings"
    assert set(config["data"]) <= KNOWN_ENV, set(config["data"]) - KNOWN_ENV
    assert config["data"]["MLFLOW_TRACKING_URI"].startswith("http")
    assert {"MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"} & set(config["data"])

    deployment = found["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    (container,) = pod["containers"]
    refs = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    assert refs == [config["metadata"]["name"]]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PYTHONPATH"] == dockerfile_env()["PYTHONPATH"] == boot_dir_in_image()
    # The spool must be writable with a read-only root filesystem, and the grace period
    # longer than the exit bound, so SIGTERM delivers before SIGKILL.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert config["data"]["TRACED_RUN_SPOOL_DIR"] in mounts
    assert pod["terminationGracePeriodSeconds"] > float(config["data"]["TRACED_RUN_EXIT_TIMEOUT"])


def test_collector_config_sends_to_mlflow_with_the_experiment_header() -> None:
    config = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    assert "otlp" in config["receivers"]
    assert "http" in config["receivers"]["otlp"]["protocols"]
    (name,) = config["exporters"]
    assert name.split("/")[0] == "otlphttp", "MLflow takes OTLP over HTTP only"
    exporter = config["exporters"][name]
    assert exporter["traces_endpoint"] == "${env:MLFLOW_TRACKING_URI}/v1/traces"
    assert exporter["headers"]["x-mlflow-experiment-id"] == "${env:MLFLOW_EXPERIMENT_ID}"
    assert exporter.get("compression", "gzip") in ("gzip", "deflate", "none")
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and pipeline["exporters"] == [name]
    assert "batch" in pipeline["processors"]
    assert set(pipeline["processors"]) <= set(config["processors"])
