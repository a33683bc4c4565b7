"""Hostile neighbours and hostile answers (issue 16, findings 1, 4, 7 and the
server-text part of 9), as a user meets them: real processes under
``traced-run`` against loopback stand-in servers (no MLflow needed: what is
checked is what leaves the machine, what lands on disk and what is said).

Each test fails on the code before the fix (066f5f4): it followed a redirect
with the credentials, printed a server's escape sequences, overwrote a file
through a planted symlink, or hung or crashed on a planted spool file."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import pwd
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import AGENT_APP, TRACED_RUN, QuietHandler, clean_env

TOKEN = "s3cret-bearer-token-for-redirects"
BATCH = "00000000000000000001-1-0000000a.otlp"
"""A name as the spool writes them, for planted files."""
RUN_TIMEOUT = 60
HOSTILE = "\x1b[2J\x1b[31mEVIL\r\nFAKE traced-run: all delivered"
"""A server answer that clears the screen, colours it and forges a line."""


@dataclass
class StandIn:
    """A loopback server that answers every request alike and records what it got."""

    url: str
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    """Method, path and headers of each request."""


@contextlib.contextmanager
def stand_in(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Iterator[StandIn]:
    server_box: list[StandIn] = []

    class Handler(QuietHandler):
        def handle_one(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            server_box[0].seen.append((self.command, self.path, dict(self.headers)))
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = handle_one

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_box.append(StandIn(f"http://127.0.0.1:{server.server_address[1]}"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server_box[0]
    finally:
        server.shutdown()
        server.server_close()


def traced_app(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "app.py").write_text(textwrap.dedent(AGENT_APP))
    return subprocess.run([TRACED_RUN, "python", "app.py"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, env=clean_env(TRACED_RUN_SPOOL_DIR=str(tmp_path / "spool"),
                                                             **env))


def said(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("traced-run:")]


def batches(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.otlp*")) if directory.is_dir() else []


# --- redirects (finding 4) ------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ["MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"])
def test_a_redirect_is_not_followed_and_the_credentials_stay(tmp_path: Path, experiment: str) -> None:
    """MLflow answering 302 to another host: urllib followed it as a GET carrying the
    Authorization header there, counted the answer as delivered and said nothing. Now the
    post (or the experiment lookup) fails with the reason, and the batch stays in the spool."""
    with contextlib.ExitStack() as servers:
        elsewhere = servers.enter_context(stand_in(200, b"{}"))
        mlflow = servers.enter_context(stand_in(302, headers={"Location": f"{elsewhere.url}/v1/traces"}))
        done = traced_app(tmp_path, MLFLOW_TRACKING_URI=mlflow.url, MLFLOW_TRACKING_TOKEN=TOKEN,
                          **{experiment: "0" if experiment.endswith("_ID") else "redirected"})
    assert done.returncode == 0, done.stderr
    assert mlflow.seen and all(headers.get("Authorization") == f"Bearer {TOKEN}"
                               for _, _, headers in mlflow.seen)
    assert elsewhere.seen == []  # neither the request nor the token went to the other host
    assert batches(tmp_path / "spool"), done.stderr
    (line,) = said(done.stderr)
    assert f"redirected to {elsewhere.url}/v1/traces, which is not followed" in line, line
    assert "kept in" in line and TOKEN not in done.stderr


def test_the_doctor_follows_no_redirect_either(tmp_path: Path) -> None:
    with contextlib.ExitStack() as servers:
        elsewhere = servers.enter_context(stand_in(200, b"3.17.2"))
        mlflow = servers.enter_context(stand_in(302, headers={"Location": elsewhere.url + "/"}))
        env = clean_env(MLFLOW_TRACKING_URI=mlflow.url, MLFLOW_TRACKING_TOKEN=TOKEN,
                        TRACED_RUN_SPOOL_DIR=str(tmp_path / "spool"))
        done = subprocess.run([TRACED_RUN, "doctor", "--json"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT, env=env)
    assert done.returncode == 1 and elsewhere.seen == []
    checks = {c["check"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["mlflow reachable"]["status"] == "FAIL"
    assert f"redirected to {elsewhere.url}/, which is not followed" in checks["mlflow reachable"]["what"]
    assert TOKEN not in done.stdout + done.stderr


# --- what servers say (finding 9: escapes) ------------------------------------------------


@pytest.mark.parametrize("status", [503, 404])
def test_control_characters_in_a_server_answer_reach_neither_the_terminal_nor_a_file(
        tmp_path: Path, status: int) -> None:
    """503: the batch is kept and the exit line quotes the answer; 404: it is set aside with
    the answer in its reason file. Before, both held the raw escape sequences."""
    with stand_in(status, HOSTILE.encode()) as mlflow:
        done = traced_app(tmp_path, MLFLOW_TRACKING_URI=mlflow.url, MLFLOW_EXPERIMENT_ID="0")
    assert done.returncode == 0, done.stderr
    (line,) = said(done.stderr)
    assert "\x1b" not in done.stderr and "\r" not in done.stderr
    escaped = "\\x1b[2J\\x1b[31mEVIL FAKE"  # CR/LF are whitespace: one space on one line
    if status == 503:
        assert f"HTTP 503 Service Unavailable: {escaped}" in line, line
        return
    assert "rejected by MLflow (HTTP 404)" in line, line
    (reason,) = (tmp_path / "spool" / "rejected").glob("*.reason.txt")
    text = reason.read_text()
    assert escaped in text and "\x1b" not in text and "\r" not in text and text.count("\n") == 1


# --- the spool of another user (finding 1) ------------------------------------------------


def test_flush_as_root_neither_sends_from_nor_writes_into_another_users_spool(
        tmp_path: Path, nobody: pwd.struct_passwd) -> None:
    """The reproduction of finding 1: a world-writable spool owned by another user, with a
    planted batch and ``rejected/<name>.reason.txt`` a symlink to a root-owned file; ``flush``
    as root against a server answering 404 overwrote that file with the 404 text."""
    victim = tmp_path / "root-owned.conf"
    victim.write_text("precious\n")
    with stand_in(404, b"NOT FOUND TEXT") as mlflow:
        spool = tmp_path / "spool"
        (spool / "rejected").mkdir(parents=True)
        header = {"endpoint": f"{mlflow.url}/v1/traces", "experiment_id": "0", "experiment_name": None,
                  "run_id": None, "spans": 1, "traces": 1}
        (spool / BATCH).write_bytes(json.dumps(header).encode() + b"\nplanted")
        (spool / "rejected" / BATCH.replace(".otlp", ".reason.txt")).symlink_to(victim)
        for path in (spool, spool / "rejected", spool / BATCH):
            os.chown(path, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
            os.chmod(path, 0o777)
        done = subprocess.run([TRACED_RUN, "flush"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT, env=clean_env(MLFLOW_TRACKING_URI=mlflow.url,
                                                                 TRACED_RUN_SPOOL_DIR=str(spool)))
    assert done.returncode == 1
    assert victim.read_text() == "precious\n"
    assert mlflow.seen == []  # the planted batch was not sent with root's credentials
    (line,) = said(done.stderr)
    assert f"spool directory {spool} belongs to uid {nobody.pw_uid}" in line, line
    assert os.stat(spool).st_mode & 0o777 == 0o777  # refused, not chmod-ed


# --- files that are no batch (finding 7) ----------------------------------------------------


def plant(spool: Path, kind: str) -> None:
    spool.mkdir(mode=0o700)
    path = spool / BATCH
    header = {"endpoint": "http://127.0.0.1:9/v1/traces", "experiment_id": "0", "spans": 1, "traces": 1}
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "deep header":
        path.write_bytes(b"[" * 60000 + b"\npayload")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(json.dumps({**header, "bytes": 1000}).encode() + b"\nshort")
    else:
        value = {"spans text": {"spans": "many"}, "mapping id": {"experiment_id": {"a": 1}},
                 "CRLF id": {"experiment_id": "0\r\nX-Injected: 1"}}[kind]
        path.write_bytes(json.dumps({**header, **value}).encode() + b"\npayload")


KINDS = ["fifo", "deep header", "spans text", "mapping id", "CRLF id", "empty", "truncated"]


@pytest.mark.parametrize("kind", KINDS)
def test_flush_sets_a_file_that_is_no_batch_aside_once_without_hanging_or_a_traceback(
        tmp_path: Path, kind: str) -> None:
    """Before: a FIFO hung flush for ever; a deep header, text spans or a mapping/CR-LF
    experiment id crashed it with a traceback; empty and truncated files stayed for ever."""
    spool = tmp_path / "spool"
    plant(spool, kind)
    env = clean_env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:9/v1/traces",
                    TRACED_RUN_SPOOL_DIR=str(spool))
    done = subprocess.run([TRACED_RUN, "flush"], cwd=tmp_path, capture_output=True, text=True, timeout=20,
                          env=env)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 files that were no readable batch set aside" in done.stdout, done.stdout
    assert batches(spool) == [] and (spool / "rejected" / BATCH).exists()
    again = subprocess.run([TRACED_RUN, "flush"], cwd=tmp_path, capture_output=True, text=True, timeout=20,
                           env=env)
    assert again.returncode == 0 and "no readable batch" not in again.stdout  # once


@pytest.mark.parametrize("kind", [*KINDS, "spool is a file"])
def test_doctor_reports_a_file_that_is_no_batch_within_its_bound(tmp_path: Path, kind: str) -> None:
    """Before: a FIFO hung the doctor (its bound covered only the network); a deep header
    or a spool directory that is a file ended it in a traceback."""
    spool = tmp_path / "spool"
    if kind == "spool is a file":
        spool.write_text("not a directory")
    else:
        plant(spool, kind)
    env = clean_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9", TRACED_RUN_SPOOL_DIR=str(spool))
    started = time.monotonic()
    done = subprocess.run([TRACED_RUN, "doctor", "--no-trace", "--json"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, env=env)
    assert time.monotonic() - started < 20
    assert "Traceback" not in done.stderr, done.stderr
    checks = {c["check"]: c for c in json.loads(done.stdout)["checks"]}
    if kind == "spool is a file":
        assert checks["spool"]["status"] == "FAIL" and "is not a directory" in checks["spool"]["what"]
    else:
        assert checks["spool unreadable"]["status"] == "WARN", checks
        assert BATCH in checks["spool unreadable"]["what"]


def test_a_fifo_in_the_spool_does_not_hold_a_traced_process(tmp_path: Path) -> None:
    """Before: the delivery thread blocked opening the FIFO, so every traced process then
    waited out its whole exit bound, and its spans went to the spool."""
    plant(tmp_path / "spool", "fifo")
    with stand_in(200, headers={"Content-Type": "application/x-protobuf"}) as mlflow:
        started = time.monotonic()
        done = traced_app(tmp_path, MLFLOW_TRACKING_URI=mlflow.url, MLFLOW_EXPERIMENT_ID="0",
                          TRACED_RUN_EXIT_TIMEOUT="50")
        seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    # A blocked delivery thread waits out the 50 s bound; one run on a loaded machine takes a few seconds.
    assert seconds < 35, f"{seconds:.1f} s: the exit bound ran out"
    assert any(method == "POST" for method, _, _ in mlflow.seen)  # the app's own spans went out
    (line,) = said(done.stderr)
    assert "set aside 1 files" in line and BATCH in line, line
