"""The compatibility matrix (matrix.py) run for real.

Each cell is a fresh venv made with the cell's interpreter: traced-run's wheel
(built once) with the cell's pydantic-ai, OpenTelemetry and OpenInference
releases. One MLflow server per server release, each in a venv of its own and
shared by the cells that name it. In each cell the unchanged app
(tests/compat/app.py) runs under ``traced-run`` and again with only
environment variables (PYTHONPATH = ``traced-run --print-pythonpath``), and
both give two traces with AGENT/LLM/TOOL spans, the conversation and the
session; the kill switch loads nothing and sends nothing; a user
``sitecustomize`` still runs once; the doctor passes and says whether the
server takes gzip. A cell below a floor must instead refuse in one line.

Venvs are installed two at a time (this is a 2-core machine), servers start
as soon as theirs is ready; every wheel is downloaded once into a wheelhouse
that serves all venvs. Venvs are kept under build/compat and reused while their
requirements are unchanged (only traced-run is reinstalled): CI starts from a
fresh clone, so it makes them all.

Run: ``python -m pytest tests/compat/cells.py`` (``.ci/run`` does, after the main suite).
"""

from __future__ import annotations

import ast
import concurrent.futures
import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import MlflowServer, clean_env, start_mlflow
from matrix import CELLS, ROOT, SERVERS, Cell, Server, supported_ranges

HERE = Path(__file__).resolve().parent
WORK = ROOT / "build" / "compat"
WHEELHOUSE = WORK / "wheelhouse"
PARALLEL = 2
INSTALL_TIMEOUT = 900
RUN_TIMEOUT = 180
PIP = ("-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check")


def interpreter(version: str) -> str | None:
    """The pyenv interpreter of a minor version (CI's machine is the same image), else one on PATH."""
    found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    return found[-1] if found else shutil.which(f"python{version}")


def _run(argv: list[str], *, timeout: float = INSTALL_TIMEOUT,
         **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... exited {done.returncode}: {done.stderr[-2000:]}")
    return done


_fetching = threading.Lock()


def venv(directory: Path, python: str, *installs: tuple[str, ...]) -> Path:
    """A venv made by ``installs`` (pip install arguments, in order), reused when an
    earlier run made the same one.

    Each step first brings the wheels it needs into one wheelhouse (pip takes a wheel
    already there over the index's copy of the same release), then installs from the
    wheelhouse alone: the servers' hundred-odd dependencies are downloaded once, not
    once per venv (pip's HTTP cache stays empty on these machines)."""
    marker = directory / "matrix-requirements.txt"
    wanted = "\n".join([python, *(" ".join(step) for step in installs)])
    if marker.exists() and marker.read_text() == wanted:
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    _run([python, "-m", "venv", str(directory)])
    house = ("--find-links", str(WHEELHOUSE))
    inside = str(directory / "bin" / "python")
    for step in installs:
        with _fetching:  # two pips writing one wheelhouse could read each other's half-written files
            _run([inside, "-m", "pip", "wheel", "--quiet", "-w", str(WHEELHOUSE), *house, *step])
        _run([inside, *PIP, "--no-index", *house, *step])
    marker.write_text(wanted)
    return directory


def build_wheel() -> Path:
    out = WORK / "wheel"
    shutil.rmtree(out, ignore_errors=True)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(ROOT)])
    (wheel,) = out.glob("traced_run-*.whl")
    return wheel


@dataclass
class Prepared:
    servers: dict[str, MlflowServer | Exception] = field(default_factory=dict)
    server_python: dict[str, Path] = field(default_factory=dict)
    cells: dict[str, Path | Exception | str] = field(default_factory=dict)
    """Its venv, why it could not be made, or (a str) why it is skipped."""


@pytest.fixture(scope="session")
def prepared() -> Iterator[Prepared]:
    shutil.rmtree(WORK / "run", ignore_errors=True)  # the servers' data of earlier runs
    WORK.mkdir(parents=True, exist_ok=True)
    wheel = build_wheel()
    done = Prepared()
    running: list[contextlib.AbstractContextManager[MlflowServer]] = []
    lock = threading.Lock()

    def server(spec: Server) -> None:
        home = venv(WORK / f"mlflow-{spec.version}", interpreter("3.11") or sys.executable, *spec.installs)
        done.server_python[spec.version] = home / "bin" / "python"
        root = WORK / "run" / f"mlflow-{spec.version}-{uuid.uuid4().hex[:8]}"
        root.mkdir(parents=True)
        manager = start_mlflow(f"sqlite:///{root / 'mlflow.db'}", root, mlflow=home / "bin" / "mlflow")
        with lock:
            running.append(manager)
        done.servers[spec.version] = manager.__enter__()

    def cell(spec: Cell) -> None:
        python = interpreter(spec.python)
        if python is None:
            done.cells[spec.name] = f"no Python {spec.python} interpreter on this machine " \
                                    f"(looked in ~/.pyenv/versions/{spec.python}.* and PATH)"
            return
        # traced-run with its dependencies once; then only traced-run itself again, so a
        # reused venv runs the code under test.
        home = venv(WORK / f"cell-{spec.name}", python, (*spec.requirements, str(wheel)))
        _run([str(home / "bin" / "python"), *PIP, "--no-deps", "--force-reinstall", str(wheel)])
        done.cells[spec.name] = home

    def guarded(key: str, into: dict[str, Any], job: Any, spec: Any) -> None:
        try:
            job(spec)
        except Exception as error:  # the cell that needs it fails with the reason
            into[key] = error

    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
        jobs = [pool.submit(guarded, v, done.servers, server, s) for v, s in SERVERS.items()]
        jobs += [pool.submit(guarded, c.name, done.cells, cell, c) for c in CELLS]
        concurrent.futures.wait(jobs)
    try:
        yield done
    finally:
        for manager in running:
            manager.__exit__(None, None, None)


@dataclass
class Context:
    cell: Cell
    home: Path
    server: MlflowServer
    reader: Path
    directory: Path

    def env(self, experiment: str, **extra: str) -> dict[str, str]:
        return clean_env(PATH=f"{self.home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                         MLFLOW_TRACKING_URI=self.server.url, MLFLOW_EXPERIMENT_NAME=experiment,
                         TRACED_RUN_SPOOL_DIR=str(self.directory / "spool"), TRACED_RUN_EXIT_TIMEOUT="60",
                         **extra)

    def run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env,
                              cwd=self.directory, stdin=subprocess.DEVNULL)

    @property
    def traced_run(self) -> str:
        return str(self.home / "bin" / "traced-run")

    def traces(self, experiment: str, count: int) -> list[dict[str, Any]]:
        done = _run([str(self.reader), str(HERE / "read_traces.py"), self.server.url, experiment, str(count),
                     "60"], timeout=RUN_TIMEOUT, env=clean_env())
        found: list[dict[str, Any]] = json.loads(done.stdout)
        return found


@pytest.fixture
def context(request: pytest.FixtureRequest, prepared: Prepared, tmp_path: Path) -> Context:
    cell: Cell = request.param
    home = prepared.cells.get(cell.name)
    if isinstance(home, str):
        pytest.skip(home)
    if not isinstance(home, Path):
        raise AssertionError(f"cell {cell.name}: its venv could not be made: {home}")
    server = prepared.servers.get(cell.server)
    if not isinstance(server, MlflowServer):
        raise AssertionError(f"MLflow {cell.server} did not start: {server}")
    return Context(cell, home, server, prepared.server_python[cell.server], tmp_path)


def _cells(supported: bool) -> Any:
    chosen = [c for c in CELLS if c.supported == supported]
    return pytest.mark.parametrize("context", chosen, ids=[c.name for c in chosen], indirect=True)


def assert_traced(traces: list[dict[str, Any]], session: str, server: Server) -> None:
    """Two agent runs, each one trace: AGENT root over LLM and TOOL spans, the LLM
    span's inputs the conversation it sent, the session on the trace."""
    assert len(traces) == 2, traces
    prompts = set()
    for trace in traces:
        assert trace["state"] == "OK", trace
        kinds = {span["type"] for span in trace["spans"]}
        assert {"AGENT", "LLM", "TOOL"} <= kinds, kinds
        (root,) = [span for span in trace["spans"] if span["parent"] is None]
        assert root["type"] == "AGENT", root
        prompts.add(root["inputs"])
        conversation = next(span for span in trace["spans"] if span["type"] == "LLM")["inputs"]
        assert isinstance(conversation, str) == server.conversation_as_text, conversation
        if server.conversation_as_text:
            conversation = json.loads(conversation)
        assert [message["role"] for message in conversation] == ["system", "user"], conversation
        assert conversation[0]["parts"][0]["content"] == "Be brief."
        assert trace["metadata"].get("mlflow.trace.session") == (session if server.session else None)
    assert prompts == {"Weather in Rome?", "Weather in Paris?"}


FORECASTS = ['{"city":"a","summary":"a"}', '{"city":"a","summary":"a"}']


@_cells(supported=True)
def test_the_unchanged_app_is_traced_by_the_launcher_and_by_env_only(context: Context) -> None:
    shutil.copy(HERE / "app.py", context.directory / "app.py")
    experiment = f"{context.cell.name}-launcher-{uuid.uuid4().hex[:8]}"
    done = context.run([context.traced_run, "python", "app.py"],
                       context.env(experiment, TRACED_RUN_SESSION_ID="launcher"))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.splitlines() == FORECASTS
    assert_traced(context.traces(experiment, 2), "launcher", SERVERS[context.cell.server])

    boot = context.run([context.traced_run, "--print-pythonpath"], clean_env()).stdout.strip()
    experiment = f"{context.cell.name}-env-{uuid.uuid4().hex[:8]}"
    done = context.run(["python", "app.py"],
                       context.env(experiment, PYTHONPATH=boot, TRACED_RUN_SESSION_ID="env"))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.splitlines() == FORECASTS
    assert_traced(context.traces(experiment, 2), "env", SERVERS[context.cell.server])


def _git(directory: Path, *args: str) -> str:
    identity = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_GLOBAL": os.devnull}
    return _run(["git", *args], cwd=directory, env={**os.environ, **identity}).stdout.strip()


@_cells(supported=True)
def test_an_app_run_from_a_git_commit_is_linked_to_its_version_where_mlflow_can(context: Context) -> None:
    shutil.copy(HERE / "app.py", context.directory / "app.py")
    (context.directory / ".gitignore").write_text("spool/\n")
    _git(context.directory, "init", "-q", "-b", "main")
    _git(context.directory, "add", "-A")
    _git(context.directory, "commit", "-q", "-m", "app")
    commit = _git(context.directory, "rev-parse", "HEAD")
    experiment = f"{context.cell.name}-git-{uuid.uuid4().hex[:8]}"
    done = context.run([context.traced_run, "python", "app.py"],
                       context.env(experiment, TRACED_RUN_SESSION_ID="git"))
    assert done.returncode == 0, done.stderr
    server = SERVERS[context.cell.server]
    traces = context.traces(experiment, 2)
    # Linked or not, the traces are whole: the link never costs the previews or the session.
    assert_traced(traces, "git", server)
    if server.links:
        assert done.stderr == ""
        for trace in traces:
            assert trace["model_tags"]["mlflow.source.git.commit"] == commit, trace["model_tags"]
            assert trace["model_tags"]["mlflow.source.git.dirty"] == "false"
            assert trace["request_preview"]
        assert len({trace["metadata"]["mlflow.modelId"] for trace in traces}) == 1
    else:
        assert done.stderr == (f"traced-run: traces are not linked to their agent version or run: MLflow "
                               f"{context.cell.server} cannot add links to a trace it stored from OTLP "
                               "(MLflow >=3.13 can)\n")
        assert all("mlflow.modelId" not in trace["metadata"] for trace in traces)


MODULES = "import sys, pydantic_ai; print(sorted(m for m in sys.modules if m.startswith('traced_run')))"


@_cells(supported=True)
def test_the_kill_switch_loads_nothing_and_a_user_sitecustomize_runs_once(context: Context) -> None:
    experiment = f"{context.cell.name}-off-{uuid.uuid4().hex[:8]}"
    done = context.run([context.traced_run, "python", "-c", MODULES],
                       context.env(experiment, TRACED_RUN_ENABLED="false"))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    loaded = ast.literal_eval(done.stdout.strip())
    assert "traced_run.bootstrap" in loaded, "the bootstrap ran, and stopped there"
    assert not {"traced_run.pipeline", "traced_run.delivery"} & set(loaded), loaded
    assert context.traces(experiment, 0) == []

    user = context.directory / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import sys\nprint('user sitecustomize ran', file=sys.stderr)\n")
    boot = context.run([context.traced_run, "--print-pythonpath"], clean_env()).stdout.strip()
    path = f"{boot}{os.pathsep}{user}"
    done = context.run(["python", "-c", MODULES],
                       context.env(experiment, PYTHONPATH=path, TRACED_RUN_ENABLED="false"))
    assert (done.returncode, done.stderr) == (0, "user sitecustomize ran\n"), done.stderr
    done = context.run(["python", "-c", MODULES], context.env(experiment, PYTHONPATH=path))
    assert (done.returncode, done.stderr) == (0, "user sitecustomize ran\n"), done.stderr
    assert "traced_run.pipeline" in done.stdout


@_cells(supported=True)
def test_the_doctor_passes_and_names_the_compression_the_server_takes(context: Context) -> None:
    experiment = f"{context.cell.name}-doctor-{uuid.uuid4().hex[:8]}"
    done = context.run([context.traced_run, "doctor", "--json"], context.env(experiment))
    report = json.loads(done.stdout)
    checks = {c["check"]: c for c in report["checks"]}
    assert done.returncode == 0, [c for c in report["checks"] if c["status"] != "OK"]
    assert checks["versions"]["status"] == "OK"
    assert checks["mlflow version"]["what"] == f"MLflow {context.cell.server}"
    takes = "takes gzip bodies" if SERVERS[context.cell.server].gzip else "refuses gzip bodies"
    assert takes in checks["otlp endpoint"]["what"]
    assert checks["end-to-end"]["status"] == "OK"


@_cells(supported=False)
def test_a_release_below_the_floor_gets_one_clear_line_and_the_app_runs(context: Context) -> None:
    shutil.copy(HERE / "app.py", context.directory / "app.py")
    floor = supported_ranges()["pydantic-ai-slim"]
    line = (f"traced-run: pydantic-ai-slim {context.cell.pydantic_ai} is not supported (traced-run supports "
            f"pydantic-ai-slim{floor}; pip install 'pydantic-ai-slim{floor}')")
    experiment = f"{context.cell.name}-{uuid.uuid4().hex[:8]}"
    done = context.run([context.traced_run, "python", "app.py"], context.env(experiment))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == FORECASTS
    assert done.stderr.splitlines() == [f"{line}; the app runs untraced"]
    assert context.traces(experiment, 0) == []

    done = context.run([context.traced_run, "--strict", "python", "app.py"], context.env(experiment))
    assert done.returncode == 70
    assert done.stdout == ""
    assert done.stderr.splitlines() == [f"{line} (strict mode: stopping the app)"]

    done = context.run([context.traced_run, "doctor", "--no-trace"], context.env(experiment))
    assert done.returncode == 1
    failed = [row for row in done.stdout.splitlines() if row.startswith("FAIL")]
    assert len(failed) == 1 and failed[0].startswith("FAIL versions: "), done.stdout
    assert line.removeprefix("traced-run: ") in failed[0]
