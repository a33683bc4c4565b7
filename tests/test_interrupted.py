"""A process that leaves in the middle of an agent run (SIGTERM from a rolling
deploy, a normal exit while a daemon thread still runs an agent) leaves a
complete trace in MLflow, in state ERROR, its open spans ended with a status
that says why, its root showing the prompt: not a trace IN_PROGRESS for ever.

Servers stopped in the middle of a request that runs an agent (a rolling deploy
sends SIGTERM to uvicorn or gunicorn all day): a request the server lets finish
arrives as the complete trace it would have been; one the server cuts off arrives
complete too, in state ERROR, its root showing the prompt."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import TRACED_RUN, App, free_port, poll, traced_env, wait_up

STUCK_IN_A_TOOL = """
    import sys
    import threading
    import time

    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    agent = Agent(TestModel(), name="slow")
    entered = threading.Event()


    @agent.tool_plain
    def wait_for_ever(city: str) -> str:
        \"\"\"Never comes back.\"\"\"
        entered.set()
        print("in the tool", flush=True)
        time.sleep(600)
        return city


    def run() -> None:
        agent.run_sync("Where is the slow tool?")


    if sys.argv[1:] == ["daemon"]:
        threading.Thread(target=run, daemon=True).start()
        entered.wait(60)
    else:
        run()
"""


def wait_complete(app: App) -> Any:
    """The experiment's one trace, once MLflow has it complete (OK or ERROR)."""

    def complete() -> Any:
        experiment_id = app.server.experiment_id(app.experiment)
        found = app.server.traces(experiment_id) if experiment_id else []
        return found if found and str(found[0].info.state).endswith(("OK", "ERROR")) else None

    (trace,) = poll(complete, timeout=60, what="a complete trace")
    return trace


def _assert_cut_off(trace: Any, why: str) -> None:
    assert str(trace.info.state).endswith("ERROR"), trace.info.state
    spans = {span.name: span for span in trace.data.spans}
    assert sorted(spans) == ["chat test", "execute_tool wait_for_ever", "invoke_agent slow"], sorted(spans)
    for name in ("invoke_agent slow", "execute_tool wait_for_ever"):
        assert str(spans[name].status.status_code).endswith("ERROR"), spans[name].status
        assert spans[name].status.description == f"interrupted: {why}"
    assert str(spans["chat test"].status.status_code).endswith("OK")
    assert "Where is the slow tool?" in str(trace.info.request_preview)


def test_sigterm_mid_run_leaves_a_complete_error_trace(app: App) -> None:
    app.write(STUCK_IN_A_TOOL)
    process = subprocess.Popen([TRACED_RUN, "python", "app.py"], cwd=app.directory, env=traced_env(app),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"in the tool\n"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGTERM, err.decode()
    assert b"traced-run:" not in err, err.decode()
    _assert_cut_off(wait_complete(app), "SIGTERM")


def test_exit_with_an_agent_still_running_in_a_daemon_thread_leaves_a_complete_error_trace(app: App) -> None:
    app.write(STUCK_IN_A_TOOL)
    done = app.run("python", "app.py", "daemon", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"in the tool\n"
    assert b"traced-run:" not in done.stderr, done.stderr.decode()
    _assert_cut_off(wait_complete(app), "process exit")


# --- servers ---------------------------------------------------------------------------

PROMPT = "Hold on for the weather in Paris"

HELD_TOOL = """
    import asyncio
    import os
    from pathlib import Path

    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    HERE = Path(__file__).parent
    agent = Agent(TestModel(), name="held")




    @agent.tool_plain
    async def wait_for_release(city: str) -> str:
        \"\"\"Comes back once the test lets it.\"\"\"
        (HERE / f"entered-{os.getpid()}").touch()
        while not (HERE / "release").exists():
            await asyncio.sleep(0.05)
        return f"{city}: released"
"""
"""An agent whose tool says it has started (a file ``entered-<pid>``) and then
waits until the test creates ``release``. The tool is async in the WSGI app too
(``run_sync`` runs it on its own loop): a sync tool runs on a thread of its own,
which a worker's interpreter waits for at exit, so a tool that never comes back
would hold the worker until gunicorn kills it, traced or not."""

ASGI_APP = HELD_TOOL + """
    from fastapi import FastAPI

    api = FastAPI()


    @api.post("/chat")
    async def chat(prompt: str) -> dict[str, str]:
        result = await agent.run(prompt)
        return {"answer": result.output}
"""

WSGI_APP = HELD_TOOL + """
    import json
    from urllib.parse import parse_qs


    def application(environ, start_response):
        prompt = parse_qs(environ["QUERY_STRING"])["prompt"][0]
        result = agent.run_sync(prompt)
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"answer": result.output}).encode()]
"""

SPAN_NAMES = ["chat test", "chat test", "execute_tool wait_for_release", "invoke_agent held"]


@dataclass
class Request:
    """One POST /chat sent on a thread: the server's answer, or what went wrong."""

    url: str
    answer: str | None = None
    error: BaseException | None = None
    _thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._send, daemon=True)
        self._thread.start()

    def _send(self) -> None:
        query = urllib.parse.urlencode({"prompt": PROMPT})
        try:
            with urllib.request.urlopen(urllib.request.Request(f"{self.url}/chat?{query}", method="POST"),
                                        timeout=60) as response:
                self.answer = response.read().decode()
        except OSError as error:  # HTTPError (a 500) is one too
            self.error = error

    def wait(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive(), "the request never came back"


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    log: Path
    directory: Path
    url: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def request_in_tool(self) -> Request:
        """Send a request and wait until its agent run is inside the tool."""
        sent = Request(self.url)
        poll(lambda: list(self.directory.glob("entered-*")) or sent.error, timeout=30,
             what="the request's agent run in its tool")
        assert sent.error is None, sent.error
        return sent

    def worker_pid(self) -> int:
        (entered,) = self.directory.glob("entered-*")
        return int(entered.name.removeprefix("entered-"))

    def release(self) -> None:
        (self.directory / "release").touch()

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout=timeout)


@contextlib.contextmanager
def serve_held(app: App, source: str, command: list[str], port: int,
            booted: Callable[[str], bool], **env: str) -> Iterator[Server]:
    """``source`` as app.py, served by ``command`` under traced-run (its own process group,
    so what is left of it is killed after the test), up and booted."""
    app.write(source)
    log = app.directory / "server.log"
    with open(log, "wb") as stream:
        process = subprocess.Popen([TRACED_RUN, *command], cwd=app.directory, stdout=stream,
                                   stderr=subprocess.STDOUT, env=traced_env(app, **env),
                                   start_new_session=True)
    server = Server(process, log, app.directory, f"http://127.0.0.1:{port}")
    try:
        wait_up(process, port, log, booted, command[0])
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def statuses(trace: Any) -> dict[str, list[str]]:
    """Each span's name -> its status (code and description), sorted."""
    found: dict[str, list[str]] = {}
    for span in trace.data.spans:
        code = str(span.status.status_code).rsplit(".", 1)[-1]
        found.setdefault(span.name, []).append(f"{code} {span.status.description or ''}".strip())
    return {name: sorted(codes) for name, codes in sorted(found.items())}


def assert_finished_ok(trace: Any) -> None:
    assert str(trace.info.state).endswith("OK"), statuses(trace)
    assert sorted(span.name for span in trace.data.spans) == SPAN_NAMES
    assert all(codes == ["OK"] * len(codes) for codes in statuses(trace).values()), statuses(trace)
    assert PROMPT in str(trace.info.request_preview)
    assert ": released" in str(trace.info.response_preview)


def assert_cut_off(trace: Any, agent: str, tool: str) -> None:
    """Complete (every span the run had started has ended: one model call, then the tool),
    ERROR, the agent's and the tool's span ended with the status descriptions given,
    the prompt as Request."""
    assert str(trace.info.state).endswith("ERROR"), statuses(trace)
    assert statuses(trace) == {"chat test": ["OK"],
                               "execute_tool wait_for_release": [f"ERROR {tool}".strip()],
                               "invoke_agent held": [f"ERROR {agent}".strip()]}
    assert PROMPT in str(trace.info.request_preview)


# --- uvicorn -----------------------------------------------------------------------------


def uvicorn(app: App, which: Callable[[str], str],
            *options: str) -> contextlib.AbstractContextManager[Server]:
    port = free_port()
    command = [which("uvicorn"), "--host", "127.0.0.1", "--port", str(port), *options, "app:api"]
    workers = int(options[options.index("--workers") + 1]) if "--workers" in options else 1
    return serve_held(app, ASGI_APP, command, port,
                   lambda log: log.count("Application startup complete") == workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_uvicorn_sigterm_lets_the_request_in_flight_finish_and_its_trace_arrives_ok(
        app: App, which: Callable[[str], str], workers: int) -> None:
    """One process (the app loaded before uvicorn's SIGTERM handler is set), and workers
    (loaded after it: uvicorn gives SIGTERM its default back and raises it again at the end)."""
    with uvicorn(app, which, "--workers", str(workers)) as server:
        sent = server.request_in_tool()
        server.process.send_signal(signal.SIGTERM)
        poll(lambda: "Waiting for connections to close" in server.output(), timeout=10,
             what="uvicorn's graceful shutdown")
        server.release()
        sent.wait()
        assert server.wait() == (-signal.SIGTERM if workers == 1 else 0), server.output()
    assert sent.answer is not None and ": released" in sent.answer, sent.error
    assert "traced-run:" not in server.output(), server.output()
    assert_finished_ok(wait_complete(app))


def test_uvicorn_graceful_timeout_cancels_the_request_and_its_trace_arrives_complete_in_error(
        app: App, which: Callable[[str], str]) -> None:
    with uvicorn(app, which, "--timeout-graceful-shutdown", "1") as server:
        sent = server.request_in_tool()
        server.process.send_signal(signal.SIGTERM)
        assert server.wait() == -signal.SIGTERM, server.output()
        sent.wait()
    assert sent.answer is None, sent.answer
    assert "traced-run:" not in server.output(), server.output()
    # pydantic-ai ends its agent span as the cancellation passes (traced-run marks it: pydantic-ai
    # records only an Exception) but never ends the tool's span, whose task is left behind: traced-run
    # ends it when the process dies by the SIGTERM uvicorn raises again at the end.
    assert_cut_off(wait_complete(app), agent="interrupted: CancelledError", tool="interrupted: SIGTERM")


# --- gunicorn ----------------------------------------------------------------------------

WORKERS = {"sync": ("app:application", WSGI_APP), "uvicorn": ("app:api", ASGI_APP)}


def gunicorn(app: App, which: Callable[[str], str], worker: str, *options: str,
             ) -> contextlib.AbstractContextManager[Server]:
    target, source = WORKERS[worker]
    port = free_port()
    command = [which("gunicorn"), "-w", "1", "-b", f"127.0.0.1:{port}",
               *(["-k", "uvicorn.workers.UvicornWorker"] if worker == "uvicorn" else []), *options, target]
    return serve_held(app, source, command, port, lambda log: "Booting worker with pid" in log,
                   PYTHONWARNINGS="ignore::DeprecationWarning")


@pytest.mark.parametrize("worker", sorted(WORKERS))
def test_gunicorn_sigterm_lets_the_request_in_flight_finish_and_its_trace_arrives_ok(
        app: App, which: Callable[[str], str], worker: str) -> None:
    with gunicorn(app, which, worker, "--graceful-timeout", "30") as server:
        sent = server.request_in_tool()
        server.process.send_signal(signal.SIGTERM)
        poll(lambda: "Handling signal: term" in server.output(), timeout=10, what="gunicorn's graceful stop")
        server.release()
        sent.wait()
        assert server.wait() == 0, server.output()
    assert sent.answer is not None and ": released" in sent.answer, sent.error
    assert "traced-run:" not in server.output(), server.output()
    assert_finished_ok(wait_complete(app))


def test_gunicorn_quick_shutdown_mid_request_leaves_a_complete_error_trace(
        app: App, which: Callable[[str], str]) -> None:
    with gunicorn(app, which, "sync", "--graceful-timeout", "30") as server:
        sent = server.request_in_tool()
        server.process.send_signal(signal.SIGINT)
        assert server.wait() == 0, server.output()
        sent.wait()
    assert sent.answer is None, sent.answer
    assert "traced-run:" not in server.output(), server.output()
    # SIGQUIT's handler raises SystemExit in the worker's main thread, in the loop run_sync runs the
    # agent on, which cancels the run on its way out: pydantic-ai ends the tool's span with an error
    # (its status says so from the exception it records) and the agent's with none, which traced-run
    # marks, as the cancellation passes through it.
    cancelled = "interrupted: CancelledError"
    assert_cut_off(wait_complete(app), agent=cancelled, tool=cancelled)


def test_gunicorn_graceful_timeout_kills_the_worker_the_spans_that_ended_still_arrive(
        app: App, which: Callable[[str], str]) -> None:
    """SIGKILL ends a worker with no code of its own run: the run's open spans never end; what had
    ended is there, and the next traced process (here ``traced-run flush``; the master, leaving after
    the kill, may be first) ends the trace's root as interrupted: the trace is not IN_PROGRESS for ever."""
    with gunicorn(app, which, "sync", "--graceful-timeout", "1") as server:
        sent = server.request_in_tool()
        server.process.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0, server.output()
        sent.wait()
        worker = server.worker_pid()
    assert sent.answer is None, sent.answer

    def gone() -> bool:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return True
        return False

    poll(gone, timeout=10, what="the worker killed")
    experiment_id = poll(lambda: app.server.experiment_id(app.experiment), timeout=30, what="the experiment")
    (trace,) = poll(lambda: app.server.traces(experiment_id), timeout=30, what="the trace")
    flushed = app.run("flush", env=traced_env(app))
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    (trace,) = app.traces(1)
    (root,) = [span for span in trace.data.spans if span.parent_id is None]
    assert str(trace.info.state).endswith("ERROR")
    assert statuses(trace) == {"chat test": ["OK"],
                               root.name: ["ERROR interrupted: the process ended before this span did"]}
