"""Plumbing for the benchmark: the venv's tools, child processes, a real MLflow
server, a loopback listener that never answers, statistics and the table.

Every process and socket here talks to 127.0.0.1 only, every wait has a deadline.
"""

from __future__ import annotations

import compileall
import contextlib
import functools
import http.server
import importlib.metadata
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
APP = BENCH_DIR / "app.py"
BIN = Path(sys.executable).parent
PYTHON = str(BIN / "python") if (BIN / "python").exists() else sys.executable
_OURS = ("MLFLOW_", "OTEL_", "TRACED_RUN_", "BENCH_")

# distribution name -> console script it must provide (None: import only)
REQUIRED: dict[str, str | None] = {
    "traced-run": "traced-run",
    "opentelemetry-distro": None,
    "opentelemetry-instrumentation": "opentelemetry-instrument",
    "opentelemetry-exporter-otlp-proto-http": None,
    "openinference-instrumentation-pydantic-ai": None,
    "pydantic-ai-slim": None,
    "mlflow": "mlflow",
}


def log(message: str) -> None:
    """Progress goes to stderr; stdout is for the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the venv


def missing_tools() -> list[str]:
    missing = []
    for dist, script in REQUIRED.items():
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
            continue
        if script is not None and not (BIN / script).exists():
            missing.append(f"{dist} (no {script} in {BIN})")
    return missing


def ensure_tools() -> None:
    """Install what the benchmark compares into the running interpreter's venv if
    absent, and byte-compile traced-run's modules."""
    missing = missing_tools()
    if missing:
        _install(missing)
    # pip compiles a wheel's modules when it installs them; an editable install's
    # are compiled by the first process that imports them, or, under
    # PYTHONDONTWRITEBYTECODE, by every process: that would be measured as our start-up.
    compileall.compile_dir(str(REPO / "src" / "traced_run"), quiet=1)


def _install(missing: list[str]) -> None:
    if sys.prefix == sys.base_prefix:
        raise SystemExit(f"missing {', '.join(missing)} and {sys.executable} is not a venv: "
                         f"run the benchmark with a venv's python, or `pip install -e {REPO}[test]` there")
    log(f"missing {', '.join(missing)}: installing {REPO}[test] into {sys.prefix}")
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        subprocess.run([sys.executable, "-m", "ensurepip", "--upgrade"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-e", f"{REPO}[test]"], check=True)
    importlib.invalidate_caches()
    still = missing_tools()
    if still:
        raise SystemExit(f"still missing after pip install: {', '.join(still)}")


def versions(dists: Sequence[str] = tuple(REQUIRED)) -> dict[str, str]:
    found = {}
    for dist in dists:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "missing"
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without tracing settings, the venv first on PATH
    (so ``python`` run by a launcher is this venv's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_OURS) and k != "PYTHONPATH"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_ENABLE_OTLP_EXPORTER"] = "false"
    env.update(extra)
    return env


def _placement() -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """The servers' CPU and the apps' CPUs; (None, None), wherever, with fewer than two.

    MLflow stores an agent run with 5-8 ms of CPU (``benchmarks/server_cost.py``), most of one
    of 2 cores while section 3's apps send to it: on the app's cores that work preempts
    the exporter that sent it while the floor, sending nothing, has none to pay. A server
    on a CPU of its own is what a remote MLflow is to the app."""
    cpus = sorted(os.sched_getaffinity(0))
    return (frozenset(cpus[-1:]), frozenset(cpus[:-1])) if len(cpus) >= 2 else (None, None)


SERVER_CPUS, APP_CPUS = _placement()
"""Where MLflow and the stand-in run (the last CPU), and section 3's apps (the others)."""


def placement_line() -> str:
    """The report's line on where the processes ran."""
    if SERVER_CPUS is None or APP_CPUS is None:
        return "- placement: none (one CPU): servers and apps shared it"
    return (f"- placement: MLflow and the stand-in on CPU {', '.join(map(str, sorted(SERVER_CPUS)))}; "
            f"section 3's apps on CPU {', '.join(map(str, sorted(APP_CPUS)))}, so that MLflow's storing "
            "of the runs is not charged to the exporter that sent them (the floor sends nothing); "
            "the other sections' apps wherever the kernel puts them")


def keep_on(cpus: frozenset[int] | None) -> None:
    """Keep the calling thread, and the threads and processes it starts, on ``cpus`` (None: anywhere)."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)  # 0: on Linux, the calling thread


def pin(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    """A child's ``preexec_fn`` for ``keep_on(cpus)``; None (no preexec_fn at all) for anywhere."""
    return None if cpus is None else functools.partial(keep_on, cpus)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- processes


@dataclass
class Done:
    """One finished child process."""

    argv: list[str]
    returncode: int
    wall_s: float
    exited_at: float  # time.monotonic() right after the child was reaped
    maxrss_kb: int
    cpu_s: float  # user + system, the child's own (and what it exec'd)
    stdout: str
    stderr: str

    def records(self) -> list[dict[str, Any]]:
        found = []
        for line in self.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found

    def result(self) -> dict[str, Any]:
        """The app's last JSON line; fails loudly when the child failed."""
        records = self.records()
        if self.returncode != 0 or not records:
            raise RuntimeError(f"{' '.join(self.argv)} exited {self.returncode}: {self.stderr[-2000:]}")
        return records[-1]


def run(argv: Sequence[str], env: Mapping[str, str], *, cwd: Path, timeout: float,
        on_line: Callable[[str], None] | None = None, cpus: frozenset[int] | None = None) -> Done:
    """Run a child to its end; wall time, exit instant and its own peak RSS (wait4).

    ``on_line`` sees stdout lines as they come (the burst uses it to learn when
    the app's loop ended while the process is still delivering); ``cpus``, where it runs."""
    env = _isolated(env, cwd)
    with tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        process = subprocess.Popen(list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE if on_line else out, stderr=err,
                                   preexec_fn=pin(cpus))
        killed = threading.Event()
        timer = threading.Timer(timeout, _kill, (process, killed))
        timer.daemon = True
        timer.start()
        lines: list[str] = []
        try:
            if on_line is not None:
                assert process.stdout is not None
                for raw in process.stdout:
                    line = raw.decode(errors="replace")
                    lines.append(line)
                    on_line(line)
            _, status, usage = os.wait4(process.pid, 0)
            exited_at = time.monotonic()
            wall = time.perf_counter() - start
        finally:
            timer.cancel()
            if process.stdout is not None:
                process.stdout.close()
        process.returncode = os.waitstatus_to_exitcode(status)
        if killed.is_set():
            raise RuntimeError(f"{' '.join(argv)} killed after {timeout}s timeout")
        out.seek(0)
        err.seek(0)
        stdout = "".join(lines) if on_line else out.read().decode(errors="replace")
        return Done(list(argv), process.returncode, wall, exited_at, int(usage.ru_maxrss),
                    usage.ru_utime + usage.ru_stime, stdout,
                    err.read().decode(errors="replace"))


_spools = itertools.count()


def _isolated(env: Mapping[str, str], workdir: Path) -> dict[str, str]:
    """Nothing a child writes lands outside ``workdir``: caches, and traced-run's
    spool, a fresh one per process (so no process re-sends another's leftovers
    and a measurement never depends on what ran before it)."""
    isolated = dict(env)
    isolated.setdefault("XDG_CACHE_HOME", str(workdir / "cache"))
    isolated.setdefault("TRACED_RUN_SPOOL_DIR", str(workdir / "spool" / str(next(_spools))))
    return isolated


def _kill(process: subprocess.Popen[bytes], killed: threading.Event) -> None:
    killed.set()
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGKILL)


def interleave(variants: Sequence[str], warmups: int, reps: int, once: Callable[[str], Any],
               what: str, *, concurrent: bool = False) -> dict[str, list[Any]]:
    """A B C A B C ...: ``warmups`` rounds thrown away, then ``reps`` rounds kept.

    ``concurrent`` runs each round's variants at the same time (only for the
    --quick smoke run of waits that are mostly sleeping, never for a real figure)."""
    kept: dict[str, list[Any]] = {v: [] for v in variants}
    for round_ in range(warmups + reps):
        if concurrent:
            with ThreadPoolExecutor(max_workers=len(variants)) as pool:
                values = list(pool.map(once, variants))
        else:
            values = [once(variant) for variant in variants]
        if round_ >= warmups:
            for variant, value in zip(variants, values, strict=True):
                kept[variant].append(value)
        label = "warm-up" if round_ < warmups else f"rep {round_ - warmups + 1}/{reps}"
        log(f"{what}: {label} done")
    return kept


# ---------------------------------------------------------------- MLflow


class Mlflow:
    """A real MLflow server on a free loopback port, its store in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log = root / "mlflow-server.log"
        self.ready = threading.Event()
        self.error: str | None = None

    def start(self) -> None:
        with open(self._log, "wb") as log_file:
            self.process = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--default-artifact-root", str(self.root / "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                # no background job workers (a dozen idle-polling processes on a 2-core box);
                # trace ingestion does not use them
                env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), cwd=self.root,
                preexec_fn=pin(SERVER_CPUS),
            )

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self._log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server not healthy after {timeout}s")

    def warm_up(self) -> None:
        """A fresh server spends seconds of lazy imports on its first agent trace: pay it now."""
        experiment = self.create_experiment("bench-warm-up")
        env = clean_env(MLFLOW_TRACKING_URI=self.url, MLFLOW_EXPERIMENT_ID=experiment,
                        TRACED_RUN_EXIT_TIMEOUT="120")
        argv = [str(BIN / "traced-run"), PYTHON, str(APP), "--runs", "0"]
        done = run(argv, env, cwd=self.root, timeout=240)
        done.result()
        arrived = self.wait_count(experiment, 1, since=time.monotonic(), deadline_s=60, settle_s=60)
        if arrived.count < 1:
            raise RuntimeError(f"warm-up trace did not arrive in MLflow ({arrived.count}); "
                               f"traced-run said: {done.stderr.strip()}")

    def start_in_background(self, timeout: float) -> threading.Thread:
        def go() -> None:
            try:
                self.start()
                self.wait_healthy(timeout)
                self.warm_up()
            except Exception as error:
                self.error = f"{type(error).__name__}: {error}"
            finally:
                self.ready.set()

        thread = threading.Thread(target=go, name="mlflow-start", daemon=True)
        thread.start()
        return thread

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout):
            raise RuntimeError(f"mlflow server not ready after {timeout}s")
        if self.error:
            raise RuntimeError(self.error)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def _call(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")

    def create_experiment(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        created = self._call("/api/2.0/mlflow/experiments/create", {"name": name})
        return str(created["experiment_id"])

    def complete_traces(self, experiment_id: str, limit_pages: int = 100) -> int:
        """Traces of the experiment that are complete (OK or ERROR), via the REST search API."""
        count = 0
        token: str | None = None
        for _ in range(limit_pages):
            location = {"type": "MLFLOW_EXPERIMENT", "mlflow_experiment": {"experiment_id": experiment_id}}
            body: dict[str, Any] = {"locations": [location], "max_results": 500}
            if token:
                body["page_token"] = token
            found = self._call("/api/3.0/mlflow/traces/search", body)
            count += sum(1 for t in found.get("traces", []) if t.get("state") in ("OK", "ERROR"))
            token = found.get("next_page_token")
            if not token:
                break
        return count

    def wait_count(self, experiment_id: str, expected: int, *, since: float, deadline_s: float,
                   settle_s: float, exited: threading.Event | None = None, interval: float = 0.5) -> Arrival:
        """Poll until ``expected`` complete traces are there, or, once ``exited`` is
        set, the count has stayed put for ``settle_s``, or ``deadline_s`` has passed.
        Reports the count and when (seconds after ``since``) the final count was first seen."""
        deadline = time.monotonic() + deadline_s
        count, changed_at, exit_seen_at = -1, time.monotonic(), None
        while True:
            now = time.monotonic()
            try:
                seen = self.complete_traces(experiment_id)
            except OSError:  # includes HTTPError: a busy server, try again
                seen = count
            if seen != count:
                count, changed_at = seen, now
            if exit_seen_at is None and (exited is None or exited.is_set()):
                exit_seen_at = now
            settled = exit_seen_at is not None and now - max(changed_at, exit_seen_at) >= settle_s
            if count >= expected or settled or now >= deadline:
                return Arrival(max(count, 0), changed_at - since)
            time.sleep(interval)


@dataclass
class Arrival:
    count: int
    last_seen_after_s: float


# ---------------------------------------------------------------- a collector that hangs


class HangingListener:
    """Accepts connections on a loopback port and never answers (nor reads)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="hanging-listener", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)
            if len(self._held) > 256:  # bounded: drop the oldest
                self._held.pop(0).close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        for conn in self._held:
            conn.close()


# ---------------------------------------------------------------- statistics and the table


class InstantOtlp:
    """A loopback OTLP/HTTP endpoint that takes every request and answers 200 at once,
    storing nothing: what an exporter costs its app when the server does no work at all.
    It runs where MLflow does (``SERVER_CPUS``)."""

    def __init__(self) -> None:
        class Answer(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # no line per request
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._serve, name="instant-otlp", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        keep_on(SERVER_CPUS)  # the threads it starts per request inherit it
        self._server.serve_forever()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Row:
    section: str
    measure: str
    variant: str
    values: list[float]
    unit: str
    versus: str = ""
    target: str = "—"
    ok: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        known = [v for v in self.values if v == v]  # without NaN
        return statistics.median(known) if known else float("nan")


def fmt(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "n/a"
    if unit in ("ms", "µs"):
        return f"{value:.0f} {unit}" if abs(value) >= 100 else f"{value:.1f} {unit}"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MB":
        return f"{value:.1f} MB"
    if unit == "":
        return f"{value:.0f}"
    return f"{value:g} {unit}"


HEADER = "| # | Measure | Variant | Median | Min-Max | vs baseline | Target | Result |"


def table(rows: Sequence[Row]) -> str:
    lines = [HEADER, "|---|---|---|---:|---:|---|---|---|"]
    for row in rows:
        known = [v for v in row.values if v == v]
        span = f"{fmt(min(known), row.unit)} - {fmt(max(known), row.unit)}" if known else "n/a"
        result = "—" if row.ok is None else ("PASS" if row.ok else "**MISS**")
        lines.append(f"| {row.section} | {row.measure} | {row.variant} | {fmt(row.median, row.unit)} | "
                     f"{span} | {row.versus or '—'} | {row.target} | {result} |")
    return "\n".join(lines)


def make_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="traced-run-bench-"))


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
