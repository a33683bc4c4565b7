"""Reaching MLflow where companies run it, each case against the real MLflow:
behind HTTPS with a private CA (server certificate, client certificate,
self-signed), through an HTTP CONNECT proxy, with authentication on
(``mlflow server --app-name basic-auth``) and with workspaces on
(``mlflow server --enable-workspaces``). Apps run under the launcher or with
the environment only, as users run them; what a user sees (the exit line,
the doctor's lines, traces in MLflow) is what is asserted."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT, AGENT_APP, TRACED_RUN, MlflowServer, clean_env, free_port, poll
from support.doctor import checks
from support.faultproxy import fault_proxy
from support.launched import boot_dir, traced_lines
from support.realservers import (
    AuthMlflow,
    WorkspaceMlflow,
    auth_mlflow,
    connect_proxy,
    https_mlflow,
    mtls_mlflow,
    pki,
    self_signed_mlflow,
    workspace_mlflow,
)
from support.tls import OTHER_HOST, ConnectProxy, Pki, SlowProxy, TlsProxy

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


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_a_certificate_for_another_host_is_said_with_its_names_and_the_url_s_host(
        host: str, tmp_path: Path, mlflow_server: MlflowServer, pki: Pki) -> None:
    """The CA is right, the certificate's names are not the URL's: a CA bundle would not fix it."""
    proxy = TlsProxy(mlflow_server.url, pki.other_host_cert, pki.other_host_key)
    try:
        env = env_for(f"https://{host}:{proxy.port}", tmp_path, MLFLOW_EXPERIMENT_ID="0",
                      MLFLOW_TRACKING_SERVER_CERT_PATH=str(pki.ca_cert))
        line = exit_line(run_app(tmp_path, env))
        status, found, _ = doctor(tmp_path, env, "--no-trace")
    finally:
        proxy.close()
    said = (f"certificate verify failed: the server's certificate holds {OTHER_HOST}, not {host}, the host "
            f"the URL names; use a URL with a name the certificate holds, or have the certificate issued "
            f"for {host}")
    assert f"4 spans of 1 trace not delivered to https://{host}:{proxy.port}/v1/traces ({said})" in line, line
    assert "CERT_PATH" not in line, line
    assert status == 1 and found["mlflow reachable"][0] == "FAIL", found
    assert OTHER_HOST in found["mlflow reachable"][1] and "CERT_PATH" not in found["mlflow reachable"][1]


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

@pytest.mark.parametrize("no_proxy", ["", "localhost,127.0.0.1"])
def test_https_through_a_connect_proxy_unless_no_proxy_covers_the_host(
        no_proxy: str, tmp_path: Path, mlflow_server: MlflowServer, https_mlflow: TlsProxy, pki: Pki,
        connect_proxy: ConnectProxy) -> None:
    name = new_name()
    env = env_for(https_mlflow.url, tmp_path, experiment=name,
                  MLFLOW_TRACKING_SERVER_CERT_PATH=str(pki.ca_cert), HTTPS_PROXY=connect_proxy.url)
    env.pop("no_proxy", None)
    env["NO_PROXY"] = no_proxy  # empty: no host is exempt
    done = run_app(tmp_path, env)
    assert done.returncode == 0 and traced_lines(done.stderr.encode()) == [], done.stderr
    one_trace(mlflow_server, name)
    status, found, _ = doctor(tmp_path, env, "--no-trace")
    assert status == 0, found
    if no_proxy:
        assert connect_proxy.targets == []
        assert "proxy" not in found
    else:
        assert f"localhost:{https_mlflow.port}" in connect_proxy.targets
        assert found["proxy"] == ("OK", f"requests to {https_mlflow.url} go through {connect_proxy.url} "
                                        "(HTTPS_PROXY; NO_PROXY does not cover the host)")


# -- authentication: the real basic-auth server -------------------------------------------------

def test_right_credentials_create_the_experiment_and_the_trace_arrives(
        tmp_path: Path, auth_mlflow: AuthMlflow) -> None:
    user, password = auth_mlflow.user()
    name = new_name()
    env = env_for(auth_mlflow.url, tmp_path, experiment=name, MLFLOW_TRACKING_USERNAME=user,
                  MLFLOW_TRACKING_PASSWORD=password)
    done = run_app(tmp_path, env)
    assert done.returncode == 0 and traced_lines(done.stderr.encode()) == [], done.stderr
    experiment_id = poll(lambda: auth_mlflow.experiment_id(name), timeout=30, what="the experiment")
    assert len(poll(lambda: auth_mlflow.traces(experiment_id), timeout=30, what="the trace")) == 1
    status, found, _ = doctor(tmp_path, env)
    assert status == 0, found
    assert found["auth"] == ("OK", f"accepted (user {user!r})")


@pytest.mark.parametrize("case", ["wrong password", "unknown user", "bearer token"])
def test_credentials_mlflow_does_not_accept_are_named_as_the_fix(
        case: str, tmp_path: Path, auth_mlflow: AuthMlflow) -> None:
    user, _ = auth_mlflow.user()
    credentials = {"wrong password": {"MLFLOW_TRACKING_USERNAME": user,
                                      "MLFLOW_TRACKING_PASSWORD": "wrong-pw"},
                   "unknown user": {"MLFLOW_TRACKING_USERNAME": "ghost", "MLFLOW_TRACKING_PASSWORD": "x"},
                   # basic-auth checks only Basic: a token is refused as no credentials at all.
                   "bearer token": {"MLFLOW_TRACKING_TOKEN": "a-token"}}[case]
    who = {"wrong password": f"user {user!r}", "unknown user": "user 'ghost'",
           "bearer token": "a bearer token"}
    name = new_name()
    env = env_for(auth_mlflow.url, tmp_path, experiment=name, **credentials)
    line = exit_line(run_app(tmp_path, env))
    assert (f"not delivered to {auth_mlflow.url}/v1/traces (HTTP 401: MLflow did not accept the credentials "
            f"({who[case]}); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
            "MLFLOW_TRACKING_TOKEN)"
            ) in line, line
    assert "wrong-pw" not in line and "a-token" not in line
    status, found, _ = doctor(tmp_path, env)
    assert status == 1
    assert found["auth"] == ("FAIL", f"/version: MLflow did not accept the credentials ({who[case]}): "
                                     "HTTP 401 "
                                     "— set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                                     "MLFLOW_TRACKING_TOKEN)")
    assert "mlflow version" not in found  # not "is MLFLOW_TRACKING_URI an MLflow tracking server?"
    assert auth_mlflow.experiment_id(name) is None


def test_a_user_without_permission_on_the_experiment_gets_mlflow_s_403_named(
        tmp_path: Path, auth_mlflow: AuthMlflow) -> None:
    user, password = auth_mlflow.user()
    experiment_id = auth_mlflow.experiment(new_name())  # the admin's: others may read it, not write
    env = env_for(auth_mlflow.url, tmp_path, MLFLOW_EXPERIMENT_ID=experiment_id,
                  MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    line = exit_line(run_app(tmp_path, env))
    assert (f"(HTTP 403 Permission denied: user {user!r} has no permission for this (MLflow's answer); "
            "ask an "
            "MLflow admin for EDIT permission on the experiment") in line, line
    status, found, _ = doctor(tmp_path, env)
    assert status == 1
    assert found["auth"][0] == "FAIL"
    assert found["auth"][1].startswith(f"{auth_mlflow.url}/v1/traces: user {user!r} has no permission "
                                       "(HTTP 403 "
                                       "Permission denied) — ask an MLflow admin for EDIT permission")
    assert auth_mlflow.traces(experiment_id) == []


# -- workspaces: the real mlflow server --enable-workspaces --------------------------------------

def test_the_workspace_gets_the_experiment_and_the_trace_not_default(
        tmp_path: Path, workspace_mlflow: WorkspaceMlflow) -> None:
    name = new_name()
    env = env_for(workspace_mlflow.url, tmp_path, experiment=name, MLFLOW_WORKSPACE="team-a")
    done = run_app(tmp_path, env)
    assert done.returncode == 0 and traced_lines(done.stderr.encode()) == [], done.stderr
    experiment_id = poll(lambda: workspace_mlflow.experiment_id(name), timeout=30, what="the experiment")
    assert len(poll(lambda: workspace_mlflow.traces(experiment_id), timeout=30, what="the trace")) == 1
    assert workspace_mlflow.experiment_id(name, "default") is None
    status, found, _ = doctor(tmp_path, env)
    assert status == 0, found
    assert found["workspace"] == ("OK", "'team-a' exists: the experiment and traces go there "
                                        "(X-MLFLOW-WORKSPACE)")


def test_an_unknown_workspace_is_a_clear_error_never_default(
        tmp_path: Path, workspace_mlflow: WorkspaceMlflow) -> None:
    name = new_name()
    env = env_for(workspace_mlflow.url, tmp_path, experiment=name, MLFLOW_WORKSPACE="team-nope")
    line = exit_line(run_app(tmp_path, env))
    assert ("(HTTP 404: Workspace 'team-nope' not found on MLflow; create it (mlflow.create_workspace) or "
            "set "
            "MLFLOW_WORKSPACE to a workspace that exists") in line, line
    assert "kept in" in line  # not set aside: the batch waits for the workspace
    assert workspace_mlflow.experiment_id(name, "default") is None
    status, found, _ = doctor(tmp_path, env)
    assert status == 1
    assert found["workspace"] == ("FAIL", f"'team-nope' does not exist on {workspace_mlflow.url} — create it "
                                          "(mlflow.create_workspace) or set MLFLOW_WORKSPACE to an existing "
                                          "workspace")


def test_a_spooled_batch_keeps_its_workspace(tmp_path: Path, workspace_mlflow: WorkspaceMlflow) -> None:
    name = new_name()
    with fault_proxy(workspace_mlflow.url) as proxy:
        proxy.mode = "refuse"
        env = env_for(proxy.url, tmp_path, experiment=name, MLFLOW_WORKSPACE="team-a")
        assert "kept in" in exit_line(run_app(tmp_path, env))
        proxy.mode = "forward"
        del env["MLFLOW_WORKSPACE"]
        sent = flush(tmp_path, env)
        assert sent.returncode == 0, sent.stdout + sent.stderr
    experiment_id = poll(lambda: workspace_mlflow.experiment_id(name), timeout=30, what="the experiment")
    assert len(poll(lambda: workspace_mlflow.traces(experiment_id), timeout=30, what="the trace")) == 1
    assert workspace_mlflow.experiment_id(name, "default") is None


def test_a_spooled_batch_for_a_workspace_mlflow_does_not_know_holds_back_nothing(
        tmp_path: Path, workspace_mlflow: WorkspaceMlflow) -> None:
    unknown, live = new_name(), new_name()
    with fault_proxy(workspace_mlflow.url) as proxy:
        proxy.mode = "refuse"
        for name, workspace in ((unknown, "team-nope"), (live, "team-a")):
            env = env_for(proxy.url, tmp_path, experiment=name, MLFLOW_WORKSPACE=workspace)
            assert "kept in" in exit_line(run_app(tmp_path, env))
        proxy.mode = "forward"
        sent = flush(tmp_path, env_for(proxy.url, tmp_path, MLFLOW_WORKSPACE="team-a"))
    assert sent.returncode == 0 and "stopped" not in sent.stderr, sent.stdout + sent.stderr
    why = [line for line in sent.stdout.splitlines() if line.startswith("set aside, the first because")]
    assert len(why) == 1 and "Workspace 'team-nope' not found" in why[0], sent.stdout
    experiment_id = poll(lambda: workspace_mlflow.experiment_id(live), timeout=30, what="the experiment")
    assert len(poll(lambda: workspace_mlflow.traces(experiment_id), timeout=30, what="the trace")) == 1


def test_a_workspace_against_mlflow_without_workspaces_is_a_clear_error(
        tmp_path: Path, mlflow_server: MlflowServer) -> None:
    env = env_for(mlflow_server.url, tmp_path, experiment=new_name(), MLFLOW_WORKSPACE="team-a")
    status, found, _ = doctor(tmp_path, env, "--no-trace")
    assert status == 1
    assert found["workspace"] == ("FAIL", f"MLFLOW_WORKSPACE=team-a is set, but {mlflow_server.url} has no "
                                          "workspaces (HTTP 500 FEATURE_DISABLED) — unset MLFLOW_WORKSPACE, "
                                          "or "
                                          "start mlflow server with --enable-workspaces")
    line = exit_line(run_app(tmp_path, env))
    assert ("this MLflow has no workspaces, and MLFLOW_WORKSPACE is set; unset MLFLOW_WORKSPACE, or start "
            "mlflow server with --enable-workspaces") in line, line


# -- spool hygiene -----------------------------------------------------------------------------

def spool_files(directory: Path) -> list[Path]:
    return sorted((directory / "spool").glob("*.otlp"))


def spooled_for_a_wrong_uri(directory: Path, name: str, **extra: str) -> tuple[str, str]:
    """Runs the app against a port nothing listens on; its run's 4 spans wait in the spool.
    The wrong URI, and how the commands count those batches: one, or two when the delivery
    thread took the first spans before the run's last one ended."""
    wrong = f"http://127.0.0.1:{free_port()}"
    line = exit_line(run_app(directory, env_for(wrong, directory, experiment=name, **extra)))
    assert "connection refused" in line and "kept in" in line, line
    files = spool_files(directory)
    heads = [json.loads(path.read_bytes().split(b"\n", 1)[0]) for path in files]
    assert len(files) in (1, 2) and sum(head["spans"] for head in heads) == 4, heads
    return wrong, "1 batch" if len(files) == 1 else "2 batches"


def spooled_long_ago(directory: Path, seconds: float) -> str:
    """A run in the spool of an app that ended ``seconds`` ago (the times in its batches' names set back);
    how many batches it is."""
    _, batches = spooled_for_a_wrong_uri(directory, new_name())
    then = time.time() - seconds
    for path in spool_files(directory):
        path.rename(path.with_name(f"{int(then * 1e9):020d}{path.name[20:]}"))  # the name holds its time
    return batches


def test_batches_for_a_wrong_uri_are_listed_and_sent_to_the_corrected_one_never_to_the_old(
        tmp_path: Path, mlflow_server: MlflowServer) -> None:
    name = new_name()
    wrong, batches = spooled_for_a_wrong_uri(tmp_path, name)
    env = env_for(mlflow_server.url, tmp_path, experiment=name, MLFLOW_TRACKING_USERNAME="alice",
                  MLFLOW_TRACKING_PASSWORD="alice-secret")
    _, found, _ = doctor(tmp_path, env, "--no-trace")
    assert found["spool other endpoints"][0] == "WARN"
    assert found["spool other endpoints"][1].startswith(f"{batches} (4 spans) for {wrong}/v1/traces, "
                                                        "the oldest ")
    listed = flush(tmp_path, env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].startswith(f"sent 0 batches (0 spans) to {mlflow_server.url}/v1/traces;")
    assert lines[1].startswith(f"left {batches} (4 spans) for {wrong}/v1/traces, the oldest ")
    assert lines[1].endswith(f"`traced-run flush --endpoint URL` sends them to {mlflow_server.url}/v1/traces"
                             ", "
                             "`traced-run flush --drop-other-endpoints` removes them")
    with socket.create_server(("127.0.0.1", int(wrong.rpartition(":")[2]))) as old:
        old.settimeout(0.1)
        sent = flush(tmp_path, env, "--endpoint", wrong)
        with pytest.raises(TimeoutError):
            old.accept()  # the credentials went nowhere but to the configured MLflow
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert sent.stdout.startswith(f"sent {batches} (4 spans) to {mlflow_server.url}/v1/traces;"), sent.stdout
    assert spool_files(tmp_path) == []
    one_trace(mlflow_server, name)


def test_drop_other_endpoints(tmp_path: Path, mlflow_server: MlflowServer) -> None:
    wrong, batches = spooled_for_a_wrong_uri(tmp_path, new_name())
    dropped = flush(tmp_path, env_for(mlflow_server.url, tmp_path), "--drop-other-endpoints")
    assert dropped.returncode == 0, dropped.stderr
    assert dropped.stdout.splitlines()[1].startswith(f"dropped {batches} (4 spans) for {wrong}/v1/traces")
    assert spool_files(tmp_path) == []


def test_a_batch_for_a_deleted_experiment_holds_back_nothing_and_goes_again_once_restored(
        tmp_path: Path, mlflow_server: MlflowServer) -> None:
    deleted, live = new_name(), new_name()
    client = mlflow_server.client()
    deleted_id = client.create_experiment(deleted)
    with fault_proxy(mlflow_server.url) as proxy:
        proxy.mode = "refuse"  # MLflow down while both runs end: their batches wait in the spool
        assert "kept in" in exit_line(run_app(tmp_path, env_for(proxy.url, tmp_path, experiment=deleted)))
        client.delete_experiment(deleted_id)
        assert "kept in" in exit_line(run_app(tmp_path, env_for(proxy.url, tmp_path, experiment=live)))
        proxy.mode = "forward"
        env = env_for(proxy.url, tmp_path)
        first = flush(tmp_path, env)
        assert first.returncode == 0 and "stopped" not in first.stderr, first.stdout + first.stderr
        one_trace(mlflow_server, live)
        why = (f"set aside, the first because experiment '{deleted}' is deleted in MLflow: restore it or use "
               "another: the batches behind it went on; once the cause is fixed, `traced-run flush "
               "--set-aside` sends them again")
        assert why in first.stdout.splitlines(), first.stdout
        second = flush(tmp_path, env)
        assert second.returncode == 0 and "stopped" not in second.stderr, second.stdout + second.stderr
        assert second.stdout.startswith("sent 0 batches (0 spans)"), second.stdout
        client.restore_experiment(deleted_id)
        again = flush(tmp_path, env, "--set-aside")
    assert again.returncode == 0, again.stdout + again.stderr
    assert re.match(r"put [12] set-aside batch(es)? back in .* to send again\n"
                    r"sent [12] batch(es)? \(4 spans\)", again.stdout), again.stdout
    one_trace(mlflow_server, deleted)
    assert spool_files(tmp_path) == [] and list((tmp_path / "spool" / "rejected").iterdir()) == []


def test_a_running_app_sets_a_spooled_batch_for_a_deleted_experiment_aside_and_delivers_its_own(
        tmp_path: Path, mlflow_server: MlflowServer) -> None:
    deleted, live = new_name(), new_name()
    client = mlflow_server.client()
    deleted_id = client.create_experiment(deleted)
    with fault_proxy(mlflow_server.url) as proxy:
        proxy.mode = "refuse"
        assert "kept in" in exit_line(run_app(tmp_path, env_for(proxy.url, tmp_path, experiment=deleted)))
        client.delete_experiment(deleted_id)
        proxy.mode = "forward"
        done = run_app(tmp_path, env_for(proxy.url, tmp_path, experiment=live))
    one_trace(mlflow_server, live)
    said = traced_lines(done.stderr.encode())
    assert said and all(f"(experiment '{deleted}' is deleted in MLflow: restore it or use another)" in line
                        and "set aside in" in line for line in said), said
    assert spool_files(tmp_path) == []


def test_batches_older_than_spool_max_age_are_removed_and_counted(
        tmp_path: Path, mlflow_server: MlflowServer) -> None:
    batches = spooled_long_ago(tmp_path, 8 * 86400)
    env = env_for(mlflow_server.url, tmp_path)
    _, found, _ = doctor(tmp_path, env, "--no-trace")
    assert found["spool expired"] == ("WARN", f"{batches} older than spool_max_age=7 d — the next traced "
                                              "process or `traced-run flush` removes them")
    done = flush(tmp_path, env)
    assert done.returncode == 0
    assert f"; removed {batches} (4 spans) older than spool_max_age=7 d;" in done.stdout, done.stdout
    assert spool_files(tmp_path) == []


def test_a_traced_process_removes_expired_batches_and_says_so(
        tmp_path: Path, mlflow_server: MlflowServer) -> None:
    spooled_long_ago(tmp_path, 2 * 3600)
    name = new_name()
    done = run_app(tmp_path, env_for(mlflow_server.url, tmp_path, experiment=name,
                                     TRACED_RUN_SPOOL_MAX_AGE="1h"))
    assert exit_line(done) == ("traced-run: 4 spans that ended processes spooled more than spool_max_age=1 h "
                               "ago "
                               "were removed from the spool")
    assert spool_files(tmp_path) == []
    one_trace(mlflow_server, name)


# -- true exit reasons -------------------------------------------------------------------------

BURST_APP = AGENT + """
    import sys

    for number in range(600):
        agent.run_sync(f"Weather number {number}?")
    print("done", flush=True)
    sys.stdin.readline()  # leaves when the test says so
"""


@pytest.mark.parametrize(("mode", "said"), [
    ("refuse", "not delivered to {url} (connection refused)"),
    ("503", "not delivered to {url} (HTTP 503 Service Unavailable"),
    ("hang", "sent to {url}: no answer within "),
])
def test_the_exit_line_says_what_mlflow_did(mode: str, said: str, tmp_path: Path,
                                             mlflow_server: MlflowServer) -> None:
    with fault_proxy(mlflow_server.url) as proxy:
        proxy.mode = mode
        done = run_app(tmp_path, env_for(proxy.url, tmp_path, MLFLOW_EXPERIMENT_ID="0",
                                         TRACED_RUN_EXIT_TIMEOUT="1"))
        line = exit_line(done)
    assert "4 spans of 1 trace " + said.format(url=f"{proxy.url}/v1/traces") in line, line


def test_a_post_a_slow_mlflow_stored_but_did_not_answer_in_time_is_not_called_undelivered(
        tmp_path: Path, mlflow_server: MlflowServer) -> None:
    """MLflow stores the run's spans at once and answers 3 s later; the process may
    wait 2 s at exit. Its line says what it knows: no answer came, MLflow may have
    the spans, they are kept and re-sending them is safe; a flush then re-sends
    them and MLflow still holds the one trace."""
    experiment_id = str(mlflow_server.client().create_experiment(new_name()))
    with fault_proxy(mlflow_server.url) as proxy:
        proxy.mode = "slow"
        env = env_for(proxy.url, tmp_path, MLFLOW_EXPERIMENT_ID=experiment_id, TRACED_RUN_EXIT_TIMEOUT="2")
        line = exit_line(run_app(tmp_path, env))
        assert proxy.count() == 1, proxy.seen
        assert "not delivered" not in line, line
        assert re.fullmatch(
            rf"traced-run: 4 spans of 1 trace sent to {re.escape(proxy.url)}/v1/traces: no answer within "
            rf"[\d.]+ s; kept in {re.escape(str(tmp_path / 'spool'))}; MLflow may already have stored them, "
            r"re-sending is safe: the next traced process or `traced-run flush` sends them", line), line
        (stored,) = poll(lambda: mlflow_server.traces(experiment_id), timeout=30, what="the trace")
        assert str(stored.info.state).endswith("OK")
        proxy.mode = "forward"
        sent = flush(tmp_path, env)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(mlflow_server.traces(experiment_id)) == 1


SLOW_TOOL_APP = """
    import sys
    import time

    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    agent = Agent(TestModel(), name="support")

    @agent.tool_plain
    def lookup(city: str) -> str:
        \"\"\"Look a city up.\"\"\"
        time.sleep(2.5)  # the first model call's span ended well over a batch interval ago
        return f"{city}: sunny"

    agent.run_sync("What is the weather in Paris?")
    print("done", flush=True)
    sys.stdin.readline()  # alive until the test has looked
"""


def test_a_live_process_posts_a_run_whole_once_it_has_ended(tmp_path: Path,
                                                            mlflow_server: MlflowServer) -> None:
    """The run's first span ends 2.5 s before its root: its spans still go in one
    request, while the process lives, and MLflow never holds a part of the run."""
    experiment_id = str(mlflow_server.client().create_experiment(new_name()))
    (tmp_path / "app.py").write_text(textwrap.dedent(SLOW_TOOL_APP))
    with fault_proxy(mlflow_server.url) as proxy:
        env = env_for(proxy.url, tmp_path, MLFLOW_EXPERIMENT_ID=experiment_id)
        app = subprocess.Popen([TRACED_RUN, "python", "app.py"], cwd=tmp_path, env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert app.stdout is not None and app.stdout.readline() == "done\n"
            (trace,) = poll(lambda: mlflow_server.traces(experiment_id), timeout=30, what="the run's trace")
            posts = proxy.count()
            _, stderr = app.communicate("leave\n", timeout=60)
        finally:
            app.kill()
    assert posts == 1, proxy.seen
    assert str(trace.info.state).endswith("OK") and len(trace.data.spans) == 4, trace
    assert traced_lines(stderr.encode()) == [], stderr


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, private to this user, filled up."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a small tmpfs cannot be mounted here: {mounted.stderr.strip()}")
    try:
        with contextlib.suppress(OSError), (disk / "filler").open("wb") as filler:
            while True:
                filler.write(b"x" * 4096)
                filler.flush()
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_named_as_the_reason_not_mlflow(tmp_path: Path, mlflow_server: MlflowServer,
                                                      full_disk: Path) -> None:
    spool = full_disk / "spool"
    with fault_proxy(mlflow_server.url) as proxy:
        proxy.mode = "refuse"
        line = exit_line(run_app(tmp_path, env_for(proxy.url, tmp_path, MLFLOW_EXPERIMENT_ID="0",
                                                   TRACED_RUN_SPOOL_DIR=str(spool))))
    assert line.startswith(f"traced-run: 4 spans lost: the disk holding the spool {spool} is full (no space "
                           "left on device)"), line
    assert line.endswith("(MLflow did not take them: connection refused)"), line


def test_an_exit_bound_reached_while_mlflow_still_answers_is_said_as_such(
        tmp_path: Path, mlflow_server: MlflowServer) -> None:
    """MLflow takes every batch, each two seconds late; the process leaves with batches
    queued (MLflow's answers are held until its runs are done, so a machine's speed
    does not decide how many), once MLflow has answered for two seconds (one that
    has answered no post yet could be hanging: it is not waited for), with an exit
    bound of 4 s. MLflow did not fail: the line says the bound ran out, not that
    MLflow did not answer. (At a second a batch, the 2400 spans' five batches could all
    be taken within the bound, the faster the client the likelier: no line to read.)"""
    experiment_id = str(mlflow_server.client().create_experiment(new_name()))
    (tmp_path / "app.py").write_text(textwrap.dedent(BURST_APP))
    slow = SlowProxy(mlflow_server.url, answer_delay=2.0)
    try:
        env = env_for(slow.url, tmp_path, MLFLOW_EXPERIMENT_ID=experiment_id, TRACED_RUN_EXIT_TIMEOUT="4",
                      TRACED_RUN_QUEUE_SIZE="100000", OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="120")
        app = subprocess.Popen([TRACED_RUN, "python", "app.py"], cwd=tmp_path, env=env, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert app.stdout is not None and app.stdout.readline() == "done\n"
            slow.held.set()
            time.sleep(2.5)  # MLflow answers meanwhile, a batch every two seconds
            _, stderr = app.communicate("leave\n", timeout=120)
        finally:
            app.kill()
    finally:
        slow.close()
    (line,) = traced_lines(stderr.encode())
    # What was queued is "not delivered", what was posted and unanswered is "sent ...: no answer
    # within N s"; either way the reason is the bound, not MLflow.
    assert re.fullmatch(
        rf"traced-run: \d+ spans of \d+ traces (not delivered to|sent to) {re.escape(slow.url)}/v1/traces"
        r"(: no answer within [\d.]+ s)? \(exit_timeout=4s reached while MLflow was still taking batches "
        r"\(it took the one before\); set TRACED_RUN_EXIT_TIMEOUT higher to wait longer at exit\)"
        r"(: kept in |; kept in ).*", line), line
    assert "did not answer" not in line and "unreachable" not in line, line
    assert mlflow_server.traces(experiment_id), "MLflow took batches meanwhile"


FORKING_APP = AGENT + """
    import asyncio
    import os
    import sys
    import time

    agent.run_sync("parent")
    # The delivery thread builds its TLS context for its first post within about a
    # second of the run's end: children forked every 40 ms cover that window.
    children = []
    for n in range(int(sys.argv[1])):
        child = os.fork()
        if child == 0:
            # Not run_sync: its event loop is the parent's, and children running at once
            # would share its epoll and steal each other's wake-ups.
            asyncio.run(agent.run(f"child {n}"))
            os._exit(0)
        children.append(child)
        time.sleep(0.04)
    for child in children:
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
"""
FORKS = 30
HUNG_CHILD = "150"
"""The children's exit bound: what a child that hung in its TLS context would wait out."""


def test_https_forked_children_deliver_without_hanging(
        tmp_path: Path, mlflow_server: MlflowServer, https_mlflow: TlsProxy, pki: Pki) -> None:
    """A child forked while its parent's delivery thread was inside OpenSSL (building
    the TLS context for its first post) hung for its whole exit bound creating its own."""
    name = new_name()
    (tmp_path / "app.py").write_text(FORKING_APP.replace("\n    ", "\n"))
    env = env_for(https_mlflow.url, tmp_path, experiment=name,
                  MLFLOW_TRACKING_SERVER_CERT_PATH=str(pki.ca_cert), TRACED_RUN_EXIT_TIMEOUT=HUNG_CHILD)
    started = time.monotonic()
    done = subprocess.run([TRACED_RUN, "python", "app.py", str(FORKS)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    took = time.monotonic() - started
    assert done.returncode == 0 and traced_lines(done.stderr.encode()) == [], done.stderr
    # A child that hung would wait out its exit bound; the forks themselves, on a loaded machine, take
    # a fraction of it.
    assert took < float(HUNG_CHILD) - 30, f"{FORKS} forks took {took:.1f} s"
    assert len(mlflow_server.wait_traces(name, FORKS + 1)) == FORKS + 1
