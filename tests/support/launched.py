"""Apps run under traced-run against the real MLflow behind a fault proxy
(support/faultproxy.py), each with a spool of its own: the agents they run,
reading their output while they run, and MLflow's traces of their runs."""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
import threading
import time
from pathlib import Path
from typing import IO, Any

from conftest import GENEROUS_EXIT, TRACED_RUN, App, MlflowServer, clean_env, poll

from support.faultproxy import FaultProxy

EXIT_TIMEOUT = 2.0
"""traced-run's default exit bound, set explicitly where a test measures it."""
POST_TIMEOUT = "60"
"""A post's timeout where a test measures an exit that must not wait for MLflow: waiting costs a minute."""
NOT_WAITING = 30.0
"""Most seconds such an exit may take: a loaded 2-core machine's shutdown stays far under it,
only a wait for MLflow (or a hang) crosses it. How soon within it is the benchmarks' figure."""
RUN_SPANS = 4
"""Spans of one TestModel run that calls its one tool: agent, 2 model requests, tool."""

TOOL_AGENT = """
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    agent = Agent(TestModel(), name={name!r})

    @agent.tool_plain
    def lookup(city: str) -> str:
        \"\"\"Look a city up.\"\"\"
        return f"{{city}}: sunny"
"""


def tool_agent(name: str, *more: str) -> str:
    """The agent's module, then more code (each part dedented on its own)."""
    return "".join(textwrap.dedent(part) for part in (TOOL_AGENT.format(name=name), *more))


LOOP_APP = """
    import os
    import sys
    import time

    # Runs until the test creates ./stop (or the safety limit): one run every ~0.2 s.
    i = 0
    while not os.path.exists("stop") and i < {limit}:
        agent.run_sync(f"{prefix} {{i}}")
        print(f"done {{i}}", flush=True)
        i += 1
        time.sleep({pause})
    print("stopped", flush=True)
"""


def loop_app(prefix: str, *, limit: int = 400, pause: float = 0.2) -> str:
    return tool_agent("looper", LOOP_APP.format(prefix=prefix, limit=limit, pause=pause))


def proxied_env(app: App, proxy: FaultProxy, **extra: str) -> dict[str, str]:
    """The app's environment with MLflow behind the proxy and a spool of its own."""
    settings = {"TRACED_RUN_SPOOL_DIR": str(spool_of(app)), "TRACED_RUN_EXIT_TIMEOUT": GENEROUS_EXIT, **extra}
    return clean_env(MLFLOW_TRACKING_URI=proxy.url, MLFLOW_EXPERIMENT_NAME=app.experiment, **settings)


def spool_of(app: App) -> Path:
    return app.directory / "spool"


def spooled(spool: Path) -> list[Path]:
    """Batches waiting in the spool (claimed ones included), oldest first."""
    if not spool.exists():
        return []
    return sorted(p for p in spool.iterdir() if ".otlp" in p.name)


def traced_lines(stderr: bytes) -> list[str]:
    return [line for line in stderr.decode().splitlines() if line.startswith("traced-run:")]


def trace_infos(server: MlflowServer, experiment: str) -> list[Any]:
    """Every trace of the experiment, without spans (paged: bursts exceed a page)."""
    experiment_id = server.experiment_id(experiment)
    if experiment_id is None:
        return []
    client = server.client()
    found: list[Any] = []
    token = None
    while True:
        page = client.search_traces(locations=[experiment_id], max_results=500, page_token=token,
                                    include_spans=False)
        found += [trace.info for trace in page]
        token = page.token
        if not token:
            return found


def finished(info: Any) -> bool:
    return str(info.state).rsplit(".", 1)[-1] in ("OK", "ERROR")


def run_numbers(infos: list[Any], prefix: str) -> list[int]:
    """The run numbers of traces whose prompt was ``"<prefix> <n>"``, sorted, repeats kept."""
    pattern = re.compile(rf'^"{re.escape(prefix)} (\d+)"$')
    numbers = []
    for info in infos:
        match = pattern.match(info.request_preview or "")
        if match:
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def wait_runs(server: MlflowServer, experiment: str, prefix: str, count: int, *,
              timeout: float = 60) -> list[Any]:
    """Poll until runs 0..count-1 of ``prefix`` are complete traces, then check
    they are there exactly once and nothing else is."""

    def ready() -> list[Any] | None:
        infos = trace_infos(server, experiment)
        done = [i for i in infos if finished(i)]
        return infos if set(run_numbers(done, prefix)) >= set(range(count)) else None

    infos: list[Any] = poll(ready, timeout=timeout, what=f"{count} '{prefix}' traces in {experiment}",
                            interval=0.5)
    assert run_numbers(infos, prefix) == list(range(count)), "a run is missing or twice"
    assert len(infos) == count, [i.request_preview for i in infos]
    assert len({i.trace_id for i in infos}) == count
    return infos


def span_counts(server: MlflowServer, experiment: str) -> list[int]:
    experiment_id = server.experiment_id(experiment)
    assert experiment_id is not None
    return [len(trace.data.spans) for trace in server.traces(experiment_id)]


class Lines:
    """A running app's stdout (or stderr), read by a thread so the test can wait for a line."""

    def __init__(self, process: subprocess.Popen[bytes], stream: IO[bytes] | None = None) -> None:
        self._process = process
        self.lines: list[str] = []
        self._changed = threading.Condition()
        stream = process.stdout if stream is None else stream
        assert stream is not None
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for raw in stream:
            with self._changed:
                self.lines.append(raw.decode().rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, line: str, timeout: float = 60) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: line in self.lines, timeout=timeout):
                raise AssertionError(f"no {line!r} within {timeout}s; got {self.lines[-5:]}")

    def first(self, start: str, timeout: float = 60) -> str:
        """The first line that starts with ``start``, once there is one."""
        def found() -> list[str]:
            return [line for line in self.lines if line.startswith(start)]

        with self._changed:
            if not self._changed.wait_for(found, timeout=timeout):
                raise AssertionError(f"no line starting {start!r} within {timeout}s; got {self.lines[-5:]}")
            return found()[0]

    def ended(self, timeout: float) -> list[str]:
        """Every line, once the stream has ended."""
        self._thread.join(timeout=timeout)
        assert not self._thread.is_alive(), f"the stream did not end within {timeout}s"
        return self.lines

    def done(self) -> int:
        """How many runs the app reported finished."""
        with self._changed:
            return sum(1 for line in self.lines if line.startswith("done "))

    def finish(self, timeout: float) -> bytes:
        """Wait for the app to end and its stdout to be read; its stderr."""
        self._process.wait(timeout=timeout)
        self._thread.join(timeout=10)
        assert self._process.stderr is not None
        return self._process.stderr.read()

    def finish_timed(self, timeout: float) -> tuple[bytes, float]:
        """``finish``, and how many seconds the app took to end from now."""
        began = time.monotonic()
        err = self.finish(timeout)
        return err, time.monotonic() - began


def start(app: App, *command: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([TRACED_RUN, *command], cwd=app.directory, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=30)


def flush(app: App, env: dict[str, str]) -> str:
    """``traced-run flush``: sends what the spool holds now; what it printed."""
    done = app.run("flush", env=env)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


def boot_dir() -> str:
    done = subprocess.run([TRACED_RUN, "--print-pythonpath"], capture_output=True, check=True,
                          env=clean_env(), timeout=60)
    path = done.stdout.decode().strip()
    assert os.path.isfile(os.path.join(path, "sitecustomize.py"))
    return path
