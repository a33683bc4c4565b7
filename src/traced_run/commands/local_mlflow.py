"""``traced-run mlflow``: a local MLflow tracking server for development.

sqlite file and artifact directory under ``--dir`` (default
``./.traced-run/mlflow``), one worker (about 14 s to start instead of 70 with
four), no background job workers, bound to 127.0.0.1 unless asked otherwise.
Waits until ``/health`` answers, prints the UI URL and the variables to
export, and stays in the foreground until Ctrl-C or SIGTERM, then stops the
server: it runs in its own process group, so its uvicorn child goes too.

Exit codes: 0 stopped by Ctrl-C/SIGTERM; 1 the server did not start or died;
2 bad option; 69 mlflow is not installed (sysexits' EX_UNAVAILABLE).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import FrameType

from traced_run.report import say

EXIT_UNAVAILABLE = 69
"""The optional ``mlflow`` extra is not installed."""
DEFAULT_DIR = os.path.join(".traced-run", "mlflow")
START_TIMEOUT = 300.0
"""Seconds to wait for /health: a cold start on a loaded 2-core machine takes tens of seconds."""
STOP_TIMEOUT = 15.0
SERVER_CWD = "/"
"""Where the server runs: `-m` puts the working directory first on sys.path (MLflow's uvicorn
child's too), and the data directory, ./.traced-run/mlflow by default, may be a cloned
repository's, with a json.py in it."""


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=STOP_TIMEOUT)
    # The group may outlive its leader (uvicorn's child): make sure none of it stays.
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=STOP_TIMEOUT)


def main(argv: list[str], parser_class: type[argparse.ArgumentParser]) -> int:
    parser = _parser(parser_class)
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port: {args.port} is not a port number")
    if importlib.util.find_spec("mlflow") is None:
        say("mlflow is not installed in this environment: pip install 'traced-run[mlflow]'")
        return EXIT_UNAVAILABLE
    directory = Path(args.dir).resolve()
    try:
        (directory / "artifacts").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        say(f"cannot create {directory}: {error.strerror or error}")
        return 1
    if not _port_free(args.host, args.port):
        say(f"{args.host}:{args.port} is in use (another MLflow?): choose another with --port")
        return 1
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
               "--default-artifact-root", str(directory / "artifacts"),
               "--host", args.host, "--port", str(args.port), "--workers", "1"]
    if args.allow_all_hosts:
        command += ["--allowed-hosts", "*"]
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            say(f"WARNING: MLflow listens on {args.host}:{args.port} and accepts any Host header, without "
                "auth: anyone who can reach this port can read and change your traces and experiments")
    local_host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    return _serve(command, directory, f"http://{local_host}:{args.port}", args.experiment_name)


def _parser(parser_class: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = parser_class(
        prog="traced-run mlflow",
        description="Start a local MLflow server for development (sqlite, artifact directory, one worker) "
        "and keep it in the foreground until Ctrl-C. Exit codes: 0 stopped; 1 did not start; 2 bad option; "
        "69 mlflow not installed.")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on (default 5000)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, loopback only)")
    parser.add_argument("--dir", default=DEFAULT_DIR,
                        help=f"where the sqlite file, artifacts and server log go (default ./{DEFAULT_DIR})")
    parser.add_argument("--allow-all-hosts", action="store_true",
                        help="accept any Host header (--allowed-hosts '*'): anyone who can reach the port "
                        "can read and write your traces")
    parser.add_argument("--experiment-name", default="my-app",
                        help="the experiment name the printed exports use")
    return parser


def _serve(command: list[str], directory: Path, url: str, experiment_name: str) -> int:
    """Run the server until it answers, then until Ctrl-C/SIGTERM or its death; it is stopped either way."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log_path = directory / "server.log"
    print(f"starting MLflow on {url} (data in {directory}, log {log_path}) ...", flush=True)

    # Ctrl-C and SIGTERM only set a flag the loops look at: an exception raised at a
    # random point (inside Popen, after the server started) could leave the server running.
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    server: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "ab") as log:
            # Own session: Ctrl-C reaches only us, and we stop the whole group in order.
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, cwd=SERVER_CWD, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not _healthy(url):
            if stop.is_set():
                return 0
            if server.poll() is not None:
                say(f"mlflow server exited with code {server.returncode} before answering: "
                    f"{_last_line(log_path)} (log: {log_path})")
                return 1
            if time.monotonic() > deadline:
                say(f"mlflow server did not answer {url}/health within {START_TIMEOUT:.0f} s "
                    f"(log: {log_path})")
                return 1
            stop.wait(0.3)
        print(f"MLflow is running (pid {server.pid}): {url}\n"
              f"  UI:  {url}\n"
              f"  export MLFLOW_TRACKING_URI={url}\n"
              f"  export MLFLOW_EXPERIMENT_NAME={experiment_name}\n"
              f"  traced-run python app.py      # in another shell; `traced-run doctor` checks the setup\n"
              "Ctrl-C stops it.", flush=True)
        while server.poll() is None:
            if stop.wait(0.5):
                return 0
        say(f"mlflow server exited with code {server.returncode}: {_last_line(log_path)} (log: {log_path})")
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            print("stopping MLflow ...", flush=True)
            _stop(server)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""
