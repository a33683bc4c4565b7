"""``traced-run doctor`` as a user runs it: against the real MLflow server, a
closed port, a listener that never answers, and a stand-in server for answers
the test MLflow does not give (401, 403 Invalid Host header). Timed: doctor
must stay bounded when MLflow is down or hangs."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TRACED_RUN, MlflowServer, QuietHandler, clean_env, free_port
from support.doctor import checks

from traced_run.commands.cli import child_environment
from traced_run.commands.doctor import PROBE
from traced_run.config.settings import Settings
from traced_run.delivery.spool import Spool, Target

SECRET = "hunter2-doctor-s3cret"
BOUND = 30.0
"""Most seconds a doctor that meets no answering MLflow may take: its own bound is 2 s per
network step (its words say which bound it kept); the launcher's start and the child probe add
CPU time, which a loaded 2-core CI machine stretches (about 1-3 s measured in all). Only a hang,
or a wait for the app's own 60 s request timeout, crosses it."""


def doctor(cwd: Path, env: dict[str, str], *options: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([TRACED_RUN, "doctor", *options], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)
    return done, time.monotonic() - started


def env_for(url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return clean_env(MLFLOW_TRACKING_URI=url, TRACED_RUN_SPOOL_DIR=str(tmp_path / "spool"), **extra)


def test_all_ok_against_mlflow_and_the_proof_trace_is_in_mlflow(
        tmp_path: Path, mlflow_server: MlflowServer) -> None:
    name = f"doctor-{uuid.uuid4().hex[:8]}"
    env = env_for(mlflow_server.url, tmp_path, MLFLOW_EXPERIMENT_NAME=name)
    done, seconds = doctor(tmp_path, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    found = checks(done.stdout)
    assert [c for c, (status, _) in found.items() if status != "OK"] == [], done.stdout
    for check in ("settings", "versions", "mlflow reachable", "host header", "mlflow version", "auth",
                  "experiment", "otlp endpoint", "end-to-end", "bootstrap", "sitecustomize", "spool"):
        assert check in found, (check, done.stdout)
    assert "does not exist yet" in found["experiment"][1]
    assert mlflow_server.experiment_id(name) is None, "doctor creates no experiment"
    match = re.search(r"trace (tr-[0-9a-f]{32}) sent and read back in (\d+) ms", found["end-to-end"][1])
    assert match, found["end-to-end"]
    trace = mlflow_server.client().get_trace(match[1])
    assert trace.info.experiment_id == "0"
    assert trace.info.tags.get("traced_run.doctor") == "true"
    summary = done.stdout.splitlines()[-1]
    print(f"doctor against a running MLflow: {seconds:.2f} s, round trip {match[2]} ms; {summary}")


def test_json_against_mlflow_names_the_trace_and_the_settings(
        tmp_path: Path, mlflow_server: MlflowServer) -> None:
    experiment_id = mlflow_server.client().create_experiment(f"doctor-{uuid.uuid4().hex[:8]}")
    env = env_for(mlflow_server.url, tmp_path, MLFLOW_EXPERIMENT_ID=experiment_id)
    done, _ = doctor(tmp_path, env, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    document = json.loads(done.stdout)
    assert document["ok"] is True
    assert {c["status"] for c in document["checks"]} == {"OK"}
    assert document["settings"]["experiment_id"] == {"value": json.dumps(experiment_id),
                                                     "source": "env MLFLOW_EXPERIMENT_ID"}
    assert document["trace"]["experiment_id"] == experiment_id
    assert mlflow_server.client().get_trace(document["trace"]["trace_id"]).info.experiment_id == experiment_id


def test_no_trace_writes_nothing(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    experiment_id = mlflow_server.client().create_experiment(f"doctor-{uuid.uuid4().hex[:8]}")
    env = env_for(mlflow_server.url, tmp_path, MLFLOW_EXPERIMENT_ID=experiment_id)
    done, _ = doctor(tmp_path, env, "--no-trace")
    assert done.returncode == 0, done.stdout
    assert "end-to-end" not in checks(done.stdout)
    assert mlflow_server.traces(experiment_id) == []


def test_endpoint_only_checks_the_otlp_endpoint(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    """The gateway pattern: apps know only the collector's endpoint (here MLflow's own route)."""
    env = clean_env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{mlflow_server.url}/v1/traces",
                    TRACED_RUN_SPOOL_DIR=str(tmp_path / "spool"))
    done, _ = doctor(tmp_path, env)
    assert done.returncode == 0, done.stdout
    found = checks(done.stdout)
    assert found["mlflow"][0] == "WARN" and "only the OTLP endpoint" in found["mlflow"][1]
    assert found["otlp endpoint"][0] == "OK"


def test_bad_run_id_fails(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    env = env_for(mlflow_server.url, tmp_path, MLFLOW_RUN_ID="0123456789abcdef")
    done, _ = doctor(tmp_path, env, "--no-trace")
    assert done.returncode == 1
    assert checks(done.stdout)["run id"][0] == "FAIL"


def test_closed_port_fails_fast_without_secrets(tmp_path: Path) -> None:
    env = env_for(f"http://127.0.0.1:{free_port()}", tmp_path, MLFLOW_TRACKING_USERNAME="someone",
                  MLFLOW_TRACKING_PASSWORD=SECRET)
    done, seconds = doctor(tmp_path, env)
    assert done.returncode == 1
    found = checks(done.stdout)
    assert found["mlflow reachable"] == ("FAIL", found["mlflow reachable"][1])
    assert "connection refused" in found["mlflow reachable"][1]
    assert found["setting password"][1] == '"***" from env MLFLOW_TRACKING_PASSWORD'
    assert SECRET not in done.stdout + done.stderr
    assert seconds < BOUND, seconds
    print(f"doctor against a closed port: {seconds:.2f} s")


def test_password_in_the_url_becomes_basic_auth_and_is_never_printed(tmp_path: Path) -> None:
    port = free_port()
    env = env_for(f"http://someone:{SECRET}@127.0.0.1:{port}", tmp_path)
    done, _ = doctor(tmp_path, env, "--json")
    assert SECRET not in done.stdout + done.stderr
    document = json.loads(done.stdout)
    settings = next(c for c in document["checks"] if c["check"] == "settings")
    assert settings["status"] == "OK"
    assert document["settings"]["tracking_uri"]["value"] == f'"http://127.0.0.1:{port}"'
    assert document["settings"]["password"] == {"value": '"***"',
                                                "source": "env MLFLOW_TRACKING_URI (from the URL)"}


@pytest.fixture
def hanging_listener() -> Iterator[str]:
    """Accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_hanging_listener_is_bounded_and_json_parses(tmp_path: Path, hanging_listener: str) -> None:
    env = env_for(hanging_listener, tmp_path, OTEL_EXPORTER_OTLP_TIMEOUT="60")
    done, seconds = doctor(tmp_path, env, "--json")
    assert done.returncode == 1
    document = json.loads(done.stdout)
    assert document["ok"] is False
    failed = [c for c in document["checks"] if c["status"] == "FAIL"]
    assert [c["check"] for c in failed] == ["mlflow reachable"], failed
    assert "no answer within 2.0 s" in failed[0]["what"], failed  # its own bound, not the app's 60 s
    assert seconds < BOUND, seconds
    print(f"doctor against a listener that never answers: {seconds:.2f} s")


def test_invalid_settings_are_one_fail_line(tmp_path: Path) -> None:
    env = env_for("http://127.0.0.1:9", tmp_path, OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="abc")
    done, _ = doctor(tmp_path, env)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    status, what = checks(done.stdout)["settings"]
    assert status == "FAIL" and "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT" in what


def planted_names(env: dict[str, str]) -> set[str]:
    """Every module the bootstrap probe's child imports (seen in such a child, bootstrap loaded)
    and every standard library module, by its top-level name."""
    seen = subprocess.run([sys.executable, "-c", PROBE + "; print(json.dumps(sorted(sys.modules)))"],
                          env=env, cwd="/", capture_output=True, text=True, timeout=60, check=True)
    imported = json.loads(seen.stdout.splitlines()[-1])
    assert "traced_run.bootstrap" in imported and "json" in imported, imported
    return {name.partition(".")[0] for name in imported} | set(sys.stdlib_module_names)


def test_nothing_in_the_working_directory_runs(tmp_path: Path) -> None:
    """A cloned repository with a module named like each one the doctor's child imports, and a
    `python` of its own found through a relative PATH entry: none of it runs."""
    repo, ran = tmp_path / "repo", tmp_path / "ran"
    repo.mkdir()
    env = env_for("http://127.0.0.1:9", tmp_path)
    names = planted_names(child_environment({}, env))
    for name in names:
        (repo / f"{name}.py").write_text(f"open({str(ran)!r}, 'a').write({name!r} + ' ')\n")
    (repo / "python").write_text(f"#!/bin/sh\necho python >> {ran}\n")
    (repo / "python").chmod(0o755)
    env["PATH"] = os.pathsep.join([".", "", env["PATH"]])
    for command in (["doctor", "--no-trace"], ["config"], ["flush"]):
        done = subprocess.run([TRACED_RUN, *command], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=60)
        assert "Traceback" not in done.stderr, done.stderr
        if command[0] == "doctor":
            assert checks(done.stdout)["bootstrap"][0] == "OK", done.stdout
    assert not ran.exists(), f"ran from the working directory: {ran.read_text()}"
    print(f"{len(names)} module names planted; none ran")


def test_bad_option_is_usage_error(tmp_path: Path) -> None:
    done, _ = doctor(tmp_path, env_for("http://127.0.0.1:9", tmp_path), "--bogus")
    assert done.returncode == 2
    assert done.stderr.startswith("traced-run: ") and len(done.stderr.splitlines()) == 1


def test_user_sitecustomize_and_spool_backlog_are_reported(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("USER_SITE = True\n")
    env = env_for("http://127.0.0.1:9", tmp_path, PYTHONPATH=str(user))
    settings = Settings(spool_dir=env["TRACED_RUN_SPOOL_DIR"])
    Spool.of(settings).put(Target("http://127.0.0.1:9/v1/traces", "0", None, None), 3, 1, b"x")
    done, _ = doctor(tmp_path, env)
    found = checks(done.stdout)
    assert found["bootstrap"][0] == "OK", done.stdout
    assert found["sitecustomize"][0] == "OK"
    assert str(user / "sitecustomize.py") in found["sitecustomize"][1]
    assert "chained" in found["sitecustomize"][1]
    assert found["spool"][0] == "WARN"
    assert "1 batches (3 spans)" in found["spool"][1] and "1 of them for this endpoint" in found["spool"][1]


class _StandIn(QuietHandler):
    """Answers as an MLflow behind auth or with a Host allow-list would."""

    mode = "auth"

    def do_GET(self) -> None:
        if self.path == "/health":
            self.answer(200, b"OK")
        elif self.mode == "host":
            self.answer(403, b"Invalid Host header - possible DNS rebinding attack detected")
        elif self.path == "/version":
            self.answer(200, b"3.17.2")
        else:
            self.answer(401, b'{"error_code": "UNAUTHENTICATED"}')


@pytest.fixture(params=["auth", "host"])
def stand_in(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    handler = type("Handler", (_StandIn,), {"mode": request.param})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield request.param, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_refused_credentials_and_host_header_fail_with_hints(
        tmp_path: Path, stand_in: tuple[str, str]) -> None:
    mode, url = stand_in
    if mode == "auth":
        env = env_for(url, tmp_path, MLFLOW_TRACKING_TOKEN=SECRET)
    else:  # credentials in the URL become Basic auth when settings load: the hint names the host alone
        env = env_for(url.replace("http://", f"http://someone:{SECRET}@"), tmp_path)
    done, _ = doctor(tmp_path, env)
    assert done.returncode == 1
    assert SECRET not in done.stdout + done.stderr
    found = checks(done.stdout)
    if mode == "auth":
        assert found["auth"][0] == "FAIL" and "401" in found["auth"][1], done.stdout
        assert "MLFLOW_TRACKING_TOKEN" in found["auth"][1]
    else:
        assert found["host header"][0] == "FAIL", done.stdout
        assert f"--allowed-hosts {url.removeprefix('http://')} (" in found["host header"][1], done.stdout
