"""Reaching MLflow where companies run it, each case against the real MLflow:
behind HTTPS with a private CA (server certificate, client certificate,
self-signed), through an HTTP CONNECT proxy, with authentication on
(``mlflow server --app-name basic-auth``) and with workspaces on
(``mlflow server --enable-workspaces``). Apps run under the launcher or with
the environment only, as users run them; what a user sees (the exit line,
the doctor's lines, traces in MLflow) is what is asserted."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT_APP, TRACED_RUN, MlflowServer, clean_env
from realservers import (
    auth_mlflow,
    connect_proxy,
    https_mlflow,
    mtls_mlflow,
    pki,
    self_signed_mlflow,
    workspace_mlflow,
)
from test_doctor import checks
from test_e2e_process import boot_dir, traced_lines
from tls import ConnectProxy, Pki, TlsProxy

__all__ = ["auth_mlflow", "connect_proxy", "https_mlflow", "mtls_mlflow", "pki", "self_signed_mlflow",
           "workspace_mlflow"]

EXIT = "60"
"""A generous exit bound: these tests are about where traces go, not how fast."""


def env_for(url: str, directory: Path, *, experiment: str | None = None, **extra: str) -> dict[str, str]:
    env = clean_env(MLFLOW_TRACKING_URI=url, TRACED_RUN_SPOOL_DIR=str(directory / "spool"),
                    TRACED_RUN_EXIT_TIMEOUT=EXIT)
    if experiment:
        env["MLFLOW_EXPERIMENT_NAME"] = experiment
    env.update(extra)
    return env


def run_app(directory: Path, env: dict[str, str], *,
            launcher: bool = True) -> subprocess.CompletedProcess[str]:
    (directory / "app.py").write_text(AGENT_APP.replace("\n    ", "\n"))
    argv = [TRACED_RUN, "python", "app.py"] if launcher else ["python", "app.py"]
    if not launcher:
        env = {**env, "PYTHONPATH": boot_dir()}
    return subprocess.run(argv, cwd=directory, env=env, capture_output=True, text=True, timeout=180)


def doctor(directory: Path, env: dict[str, str],
           *options: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    done = subprocess.run([TRACED_RUN, "doctor", *options], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=60)
    return done.returncode, checks(done.stdout), done.stderr


def flush(directory: Path, env: dict[str, str], *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRACED_RUN, "flush", *options], cwd=directory, env=env, capture_output=True,
                          text=True, timeout=120)


def one_trace(server: MlflowServer, experiment: str) -> Any:
    (trace,) = server.wait_traces(experiment, 1)
    return trace


def exit_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = traced_lines(done.stderr.encode())
    assert len(lines) == 1, done.stderr
    return lines[0]


def new_name() -> str:
    return f"reach-{uuid.uuid4().hex[:10]}"


# -- HTTPS with a private CA -------------------------------------------------------------------

@pytest.mark.parametrize("variable", ["MLFLOW_TRACKING_SERVER_CERT_PATH", "REQUESTS_CA_BUNDLE",
                                      "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"])
def test_https_with_a_private_ca_through_the_launcher(
        variable: str, tmp_path: Path, mlflow_server: MlflowServer, https_mlflow: TlsProxy, pki: Pki) -> None:
    name = new_name()
    done = run_app(tmp_path, env_for(https_mlflow.url, tmp_path, experiment=name,
                                     **{variable: str(pki.ca_cert)}))
    assert done.returncode == 0 and traced_lines(done.stderr.encode()) == [], done.stderr
    assert one_trace(mlflow_server, name).info.request_preview


def test_https_with_a_private_ca_env_only(
        tmp_path: Path, mlflow_server: MlflowServer, https_mlflow: TlsProxy, pki: Pki) -> None:
    name = new_name()
    done = run_app(tmp_path, env_for(https_mlflow.url, tmp_path, experiment=name,
                                     MLFLOW_TRACKING_SERVER_CERT_PATH=str(pki.ca_cert)), launcher=False)
    assert done.returncode == 0 and traced_lines(done.stderr.encode()) == [], done.stderr
    one_trace(mlflow_server, name)


def test_without_the_ca_the_exit_line_says_certificate_verify_failed_and_flush_sends_later(
        tmp_path: Path, mlflow_server: MlflowServer, https_mlflow: TlsProxy, pki: Pki) -> None:
    name = new_name()
    env = env_for(https_mlflow.url, tmp_path, experiment=name)
    done = run_app(tmp_path, env)
    line = exit_line(done)
    assert "not delivered to" in line and "certificate verify failed: unable to get local issuer " \
        "certificate; set MLFLOW_TRACKING_SERVER_CERT_PATH" in line, line
    assert "4 spans of 1 trace not delivered" in line, line
    assert mlflow_server.experiment_id(name) is None
    status, found, _ = doctor(tmp_path, env, "--no-trace")
    assert status == 1
    assert found["mlflow reachable"][0] == "FAIL"
    assert "certificate verify failed" in found["mlflow reachable"][1]
    assert "— set MLFLOW_TRACKING_SERVER_CERT_PATH" in found["mlflow reachable"][1]
    sent = flush(tmp_path, {**env, "MLFLOW_TRACKING_SERVER_CERT_PATH": str(pki.ca_cert)})
    assert sent.returncode == 0, sent.stdout + sent.stderr
    one_trace(mlflow_server, name)


def test_doctor_all_ok_over_https_with_the_ca(
        tmp_path: Path, https_mlflow: TlsProxy, pki: Pki) -> None:
    env = env_for(https_mlflow.url, tmp_path, experiment=new_name(), REQUESTS_CA_BUNDLE=str(pki.ca_cert))
    status, found, _ = doctor(tmp_path, env)
    assert status == 0, found
    assert found["end-to-end"][0] == "OK"


@pytest.mark.parametrize("how", ["mlflow-combined", "otel-cert-and-key"])
def test_a_client_certificate_the_server_requires(
        how: str, tmp_path: Path, mlflow_server: MlflowServer, mtls_mlflow: TlsProxy, pki: Pki) -> None:
    name = new_name()
    certs = ({"MLFLOW_TRACKING_CLIENT_CERT_PATH": str(pki.client_combined)} if how == "mlflow-combined" else
             {"OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": str(pki.client_cert),
              "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": str(pki.client_key)})
    env = env_for(mtls_mlflow.url, tmp_path, experiment=name,
                  MLFLOW_TRACKING_SERVER_CERT_PATH=str(pki.ca_cert),
                  **certs)
    done = run_app(tmp_path, env)
    assert done.returncode == 0 and traced_lines(done.stderr.encode()) == [], done.stderr
    one_trace(mlflow_server, name)
    assert "traced-run client" in mtls_mlflow.client_subjects
    status, found, _ = doctor(tmp_path, env, "--no-trace")
    assert status == 0, found


def test_without_the_client_certificate_the_fix_is_named(
        tmp_path: Path, mlflow_server: MlflowServer, mtls_mlflow: TlsProxy, pki: Pki) -> None:
    name = new_name()
    env = env_for(mtls_mlflow.url, tmp_path, experiment=name,
                  MLFLOW_TRACKING_SERVER_CERT_PATH=str(pki.ca_cert))
    line = exit_line(run_app(tmp_path, env))
    assert "client certificate; set MLFLOW_TRACKING_CLIENT_CERT_PATH" in line, line
    status, found, _ = doctor(tmp_path, env, "--no-trace")
    assert status == 1 and found["mlflow reachable"][0] == "FAIL"
    assert "— set MLFLOW_TRACKING_CLIENT_CERT_PATH" in found["mlflow reachable"][1]


def test_self_signed_fails_verification_and_insecure_tls_sends_with_one_warning(
        tmp_path: Path, mlflow_server: MlflowServer, self_signed_mlflow: TlsProxy) -> None:
    name = new_name()
    env = env_for(self_signed_mlflow.url, tmp_path, experiment=name)
    line = exit_line(run_app(tmp_path, env))
    assert "certificate verify failed: self-signed certificate; set MLFLOW_TRACKING_SERVER_CERT_PATH" in line
    env["MLFLOW_TRACKING_INSECURE_TLS"] = "true"
    done = run_app(tmp_path, env)
    assert done.returncode == 0
    assert traced_lines(done.stderr.encode()) == [
        "traced-run: MLFLOW_TRACKING_INSECURE_TLS is true: the MLflow server's certificate is not verified, "
        "so anyone on the way can read and change traces; use it for a development server only"]
    mlflow_server.wait_traces(name, 2)  # the second run also sent the batch the first one spooled
    status, found, _ = doctor(tmp_path, env, "--no-trace")
    assert status == 0 and found["tls"][0] == "WARN", found


# -- proxies -------------------------------------------------------------------------------------

def test_https_through_a_connect_proxy_and_doctor_shows_it(
        tmp_path: Path, mlflow_server: MlflowServer, https_mlflow: TlsProxy, pki: Pki,
        connect_proxy: ConnectProxy) -> None:
    name = new_name()
    env = env_for(https_mlflow.url, tmp_path, experiment=name,
                  MLFLOW_TRACKING_SERVER_CERT_PATH=str(pki.ca_cert),
                  HTTPS_PROXY=connect_proxy.url)
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    done = run_app(tmp_path, env)
    assert done.returncode == 0 and traced_lines(done.stderr.encode()) == [], done.stderr
    one_trace(mlflow_server, name)
    assert f"localhost:{https_mlflow.port}" in connect_proxy.targets
    status, found, _ = doctor(tmp_path, env, "--no-trace")
    assert status == 0, found
    assert found["proxy"] == ("OK", f"requests to {https_mlflow.url} go through {connect_proxy.url} "
                                    "(HTTPS_PROXY; NO_PROXY does not cover the host)")


def test_no_proxy_covering_the_host_goes_direct(
        tmp_path: Path, mlflow_server: MlflowServer, https_mlflow: TlsProxy, pki: Pki,
        connect_proxy: ConnectProxy) -> None:
    name = new_name()
    env = env_for(https_mlflow.url, tmp_path, experiment=name,
                  MLFLOW_TRACKING_SERVER_CERT_PATH=str(pki.ca_cert),
                  HTTPS_PROXY=connect_proxy.url, NO_PROXY="localhost,127.0.0.1")
    done = run_app(tmp_path, env)
    assert done.returncode == 0 and traced_lines(done.stderr.encode()) == [], done.stderr
    one_trace(mlflow_server, name)
    assert connect_proxy.targets == []
    _, found, _ = doctor(tmp_path, env, "--no-trace")
    assert "proxy" not in found
