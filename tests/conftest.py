"""Shared test fixtures: one real MLflow server per session, apps run as real
processes under ``traced-run``, traces read back through MLflow's API."""

from __future__ import annotations

import contextlib
import http.server
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.faultproxy import FaultProxy, fault_proxy

BIN = Path(sys.executable).parent
TRACED_RUN = str(BIN / "traced-run")
_OURS = ("MLFLOW_", "OTEL_", "TRACED_RUN_")
SESSION_SPOOL = tempfile.mkdtemp(prefix="traced-run-tests-spool-")
"""Tests that look at a spool set their own; the rest keep theirs out of ~/.cache."""


UNIT = Path(__file__).parent / "unit"
MLFLOW_FIXTURES = {"mlflow_server", "auth_mlflow", "workspace_mlflow", "mlflow_on_postgres"}
"""Fixtures that start a real MLflow server: a test that uses one (directly or through
another fixture) is e2e. A new fixture that starts one belongs here."""


def pytest_configure(config: pytest.Config) -> None:
    """A suite started in the background by a non-interactive shell (``pytest &``, nohup) has
    SIGINT ignored, and every app it starts would inherit that: the tests that send SIGINT
    would wait out the app's whole loop instead of testing Ctrl-C. Python's own handler is
    reset to the default in each child it starts."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test's layer (pyproject.toml's markers), so ``-m unit`` selects the fast
    layer with no list of paths to keep: tests/unit is unit, a test that needs an
    MLflow server is e2e, any other is integration (it runs traced-run or another
    program as a process). A layer marked by hand (a test that starts MLflow
    without a fixture) is left as it is."""
    for item in items:
        if any(item.get_closest_marker(layer) for layer in ("unit", "integration", "e2e")):
            continue
        if item.path.is_relative_to(UNIT):
            item.add_marker(pytest.mark.unit)
        elif MLFLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
        else:
            item.add_marker(pytest.mark.integration)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The test runner's environment without any setting of ours leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS) and k != "PYTHONPATH"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_ENABLE_OTLP_EXPORTER"] = "false"
    env["TRACED_RUN_SPOOL_DIR"] = SESSION_SPOOL
    env.update(extra)
    return env


def poll(check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.25) -> Any:
    """Call ``check`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen[bytes]

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def experiment_id(self, name: str) -> str | None:
        experiment = self.client().get_experiment_by_name(name)
        return None if experiment is None else str(experiment.experiment_id)

    def traces(self, experiment_id: str) -> list[Any]:
        import mlflow

        mlflow.set_tracking_uri(self.url)
        # No max_results: MLflow pages through all of them, so a count past a page
        # fails as "too many" instead of polling until the deadline.
        return list(mlflow.search_traces(locations=[experiment_id], return_type="list"))

    def wait_traces(self, experiment: str, count: int, *, timeout: float = 30,
                    by_name: bool = True) -> list[Any]:
        """Polls until ``count`` traces are there and all complete, then fails
        if there are more than ``count``."""

        def ready() -> list[Any] | None:
            experiment_id = self.experiment_id(experiment) if by_name else experiment
            if experiment_id is None:
                return None
            found = self.traces(experiment_id)
            done = [t for t in found if str(t.info.state) in ("OK", "ERROR", "TraceState.OK",
                                                               "TraceState.ERROR")]
            return found if len(found) >= count and len(done) == len(found) else None

        found: list[Any] = poll(ready, timeout=timeout, what=f"{count} traces in {experiment}")
        assert len(found) == count, f"expected {count} traces, found {len(found)}"
        return found


@contextlib.contextmanager
def start_mlflow(backend_uri: str, root: Path, *, health_timeout: float = 180,
                 mlflow: Path = BIN / "mlflow", args: tuple[str, ...] = (),
                 env: Mapping[str, str] | None = None) -> Iterator[MlflowServer]:
    """A real MLflow server on ``backend_uri``, its log and artifacts under ``root``,
    up (healthy) while the ``with`` block runs and stopped after it; ``mlflow`` is
    the command of the MLflow release to run; ``args`` and ``env`` add to its
    command line and environment."""
    port = free_port()
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", backend_uri,
             "--default-artifact-root", str(root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", *args],
            # Job workers (about ten processes) do nothing for traces and would load two cores.
            stdout=log, stderr=subprocess.STDOUT,
            env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", **(env or {})),
            cwd=root, start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"mlflow server exited: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        try:
            poll(healthy, timeout=health_timeout, what=f"mlflow server health ({backend_uri})", interval=0.5)
            yield MlflowServer(url, process)
        finally:
            # The whole group: MLflow 3.6 and 3.7 leave their uvicorn child running when
            # only `mlflow server` is terminated.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow")
    with start_mlflow(f"sqlite:///{root / 'mlflow.db'}", root) as server:
        _warm_up(server.url, root)
        yield server


def _warm_up(url: str, directory: Path) -> None:
    """The first agent trace a fresh MLflow server stores costs it seconds of
    lazy imports (span translation, cost tables): pay that once here, not
    inside some test's exit bound."""
    (directory / "warm_up.py").write_text(textwrap.dedent(AGENT_APP))
    subprocess.run([TRACED_RUN, "python", "warm_up.py"], cwd=directory, check=True, timeout=180,
                   capture_output=True, env=clean_env(MLFLOW_TRACKING_URI=url, TRACED_RUN_EXIT_TIMEOUT="120"))


@dataclass
class App:
    """An app written to a temporary directory, run as a real process."""

    directory: Path
    server: MlflowServer
    experiment: str

    def write(self, source: str, name: str = "app.py") -> Path:
        path = self.directory / name
        path.write_text(textwrap.dedent(source))
        return path

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(MLFLOW_TRACKING_URI=self.server.url, MLFLOW_EXPERIMENT_NAME=self.experiment,
                         **extra)

    def run(self, *command: str, env: Mapping[str, str] | None = None, timeout: float = 120,
            launcher: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        argv = [TRACED_RUN, *command] if launcher else list(command)
        return subprocess.run(argv, cwd=self.directory, env=dict(env if env is not None else self.env()),
                              capture_output=True, timeout=timeout, input=input)

    def traces(self, count: int, timeout: float = 30) -> list[Any]:
        return self.server.wait_traces(self.experiment, count, timeout=timeout)


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A test's stand-in HTTP server: whole answers in one call, and no log line
    per request on stderr, where a test's own output is read."""

    def answer(self, status: int, body: bytes, content_type: str | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


GENEROUS_EXIT = "60"
"""These tests are about what arrives, not how fast: a loaded machine must not
turn a slow MLflow answer into a lost trace. The exit bound has its own tests."""


def traced_env(app: App, *, experiment: bool = True, exit_timeout: str = GENEROUS_EXIT,
               **extra: str) -> dict[str, str]:
    """The app's environment here: MLflow, the test's experiment unless told
    otherwise, a spool of its own (a batch spooled in one test must not be
    re-sent into another test's counts) and a generous exit bound."""
    env = app.env() if experiment else clean_env(MLFLOW_TRACKING_URI=app.server.url)
    env.update(TRACED_RUN_SPOOL_DIR=str(app.directory / "spool"), TRACED_RUN_EXIT_TIMEOUT=exit_timeout)
    env.update(extra)
    return env


@pytest.fixture
def app(tmp_path: Path, mlflow_server: MlflowServer) -> App:
    return App(tmp_path, mlflow_server, f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def proxy(mlflow_server: MlflowServer) -> Iterator[FaultProxy]:
    """The fault proxy (tests/support/faultproxy.py) in front of the session's MLflow."""
    with fault_proxy(mlflow_server.url) as running:
        yield running


def spans_by_type(trace: Any) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for span in trace.data.spans:
        grouped.setdefault(str(span.span_type), []).append(span)
    return grouped


AGENT = """
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    agent = Agent(TestModel(), name="support", instructions="Be brief.")

    @agent.tool_plain
    def lookup(city: str) -> str:
        \"\"\"Look a city up.\"\"\"
        return f"{city}: sunny"
"""
"""The agent of the test apps, with one tool; an app adds the lines that run it."""

AGENT_APP = AGENT + """
    result = agent.run_sync("What is the weather in Paris?")
    print(result.output)
"""


@pytest.fixture
def which() -> Callable[[str], str]:
    def find(name: str) -> str:
        found = shutil.which(name, path=str(BIN)) or shutil.which(name)
        assert found, f"{name} not installed"
        return found

    return find


@contextlib.contextmanager
def serving(app: App, command: list[str], port: int, env: Mapping[str, str],
            booted: Callable[[str], bool] = lambda log: True) -> Iterator[Path]:
    """A server started under traced-run, up (its port open and ``booted(log)``) while
    the block runs, then stopped with SIGTERM; yields its log (stdout and stderr)."""
    log = app.directory / "server.log"
    with open(log, "wb") as stream:
        server = subprocess.Popen([TRACED_RUN, *command], cwd=app.directory, env=env, stdout=stream,
                                  stderr=subprocess.STDOUT)
    try:
        wait_up(server, port, log, booted, command[0])
        yield log
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def wait_up(server: subprocess.Popen[bytes], port: int, log: Path, booted: Callable[[str], bool],
            what: str) -> None:
    """Until ``server`` has its port open and ``booted(log)`` (its output); fails if it exits first."""

    def up() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return booted(log.read_text(errors="replace"))

    poll(up, timeout=90, what=f"{what} on port {port}", interval=0.3)


def json_depth(value: Any) -> int:
    """How deep arrays and objects nest in a parsed JSON value."""
    if isinstance(value, dict):
        return 1 + max(map(json_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(json_depth, value), default=0)
    return 0


def request(url: str, method: str = "GET", data: bytes | None = None) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=60) as answer:
        return str(answer.read().decode())


@pytest.fixture(name="nobody")
def second_user() -> Iterator[pwd.struct_passwd]:
    """The user ``nobody``, to whom root can give a directory (for the spool tests)."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to give a directory to a second local user")
    try:
        yield pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this machine")


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, so no ./traced-run.yaml is found by accident."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work
