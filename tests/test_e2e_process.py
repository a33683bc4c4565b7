"""traced-run stays out of the app's way as a process: deployment without the
launcher, the user's own sitecustomize, child processes, stdio, exit codes,
uncaught exceptions, SIGTERM, and an MLflow that is down or never answers
(the exit waits at most ``exit_timeout``, and says once what was lost)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import TRACED_RUN, App, MlflowServer, clean_env, free_port, spans_by_type, traced_env
from support.launched import boot_dir, traced_lines

EXIT_TIMEOUT = 2.0
"""traced-run's default exit bound, set explicitly where a test measures it."""
POST_TIMEOUT = "60"
"""The export timeout where a test measures an exit from an MLflow that does not answer:
without the exit bound, such an exit takes it."""
MARGIN = 20.0
"""Seconds on top of an exit bound that only a hang, or a wait for the export timeout,
reaches: an exit that leaves at once took 1.92 s at load average 7. How soon within it
is the benchmarks' figure (benchmarks/run.py, benchmarks/sigterm.py)."""
SIGTERM_EXIT = 10.0
"""Exit bound of the SIGTERM tests that expect the trace: long enough for a
loaded MLflow to answer, short against the app's 120 s sleep. The 2 s bound on
SIGTERM is measured against a hanging MLflow instead."""

ONE_RUN_APP = """
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    agent = Agent(TestModel(custom_output_text={answer!r}), name={name!r})
    print(agent.run_sync({prompt!r}).output)
"""


def one_run_app(name: str, prompt: str, answer: str = "done") -> str:
    return ONE_RUN_APP.format(name=name, prompt=prompt, answer=answer)


def only_trace(app: App) -> Any:
    (trace,) = app.traces(1)
    return trace


# --- deployment ----------------------------------------------------------------

def test_env_only_deployment_without_the_launcher(app: App) -> None:
    app.write(one_run_app("envonly", "Traced without the launcher?"))
    env = traced_env(app, PYTHONPATH=boot_dir())
    done = app.run("python", "app.py", env=env, launcher=False)
    assert done.returncode == 0, done.stderr.decode()
    assert (done.stdout, done.stderr) == (b"done\n", b"")
    trace = only_trace(app)
    assert sorted(spans_by_type(trace)) == ["AGENT", "LLM"]
    assert trace.info.request_preview == '"Traced without the launcher?"'
    assert trace.info.tags["service.name"] == "app"


USER_SITECUSTOMIZE = """
    import os
    import sys

    with open(os.environ["USER_SITE_LOG"], "a") as log:
        log.write(f"{os.getpid()} {os.path.basename(sys.argv[0])}\\n")
"""


@pytest.mark.parametrize("launcher", [True, False], ids=["launcher", "env-only"])
def test_user_sitecustomize_still_runs_exactly_once(app: App, launcher: bool) -> None:
    (app.directory / "usersite").mkdir()
    app.write(USER_SITECUSTOMIZE, "usersite/sitecustomize.py")
    app.write(one_run_app("chained", "Is my sitecustomize kept?"))
    log = app.directory / "sitecustomize.log"
    user_path = str(app.directory / "usersite")
    pythonpath = user_path if launcher else os.pathsep.join([boot_dir(), user_path])
    env = traced_env(app, PYTHONPATH=pythonpath, USER_SITE_LOG=str(log))
    done = app.run("python", "app.py", env=env, launcher=launcher)
    assert done.returncode == 0, done.stderr.decode()
    assert (done.stdout, done.stderr) == (b"done\n", b"")
    assert only_trace(app).info.request_preview == '"Is my sitecustomize kept?"'
    runs = [line.split() for line in log.read_text().splitlines()]
    assert [program for _, program in runs] == ["app.py"], runs


EARLY_SITECUSTOMIZE = """
    # Builds an agent before traced-run's import hook could exist: pydantic_ai
    # is already imported when our bootstrap gets its turn.
    import builtins

    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    builtins.early_agent = Agent(TestModel(custom_output_text="built early"), name="early")
"""


def test_agent_built_by_the_user_sitecustomize_before_our_hook_is_traced(app: App) -> None:
    (app.directory / "usersite").mkdir()
    app.write(EARLY_SITECUSTOMIZE, "usersite/sitecustomize.py")
    app.write("import builtins\nprint(builtins.early_agent.run_sync('Built before the hook?').output)\n")
    env = traced_env(app, PYTHONPATH=str(app.directory / "usersite"))
    done = app.run("python", "app.py", env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert (done.stdout, done.stderr) == (b"built early\n", b"")
    trace = only_trace(app)
    assert [s.name for s in spans_by_type(trace)["AGENT"]] == ["invoke_agent early"]
    assert trace.info.request_preview == '"Built before the hook?"'


def test_child_python_process_is_traced_too(app: App) -> None:
    app.write(one_run_app("child_agent", "From the child", "child done"), "child.py")
    app.write("""
        import subprocess
        import sys

        from pydantic_ai import Agent
        from pydantic_ai.models.test import TestModel

        agent = Agent(TestModel(custom_output_text="parent done"), name="parent_agent")
        print(agent.run_sync("From the parent").output, flush=True)
        sys.exit(subprocess.run([sys.executable, "child.py"]).returncode)
    """)
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    assert (done.stdout, done.stderr) == (b"parent done\nchild done\n", b"")
    traces = app.traces(2)
    by_service = {t.info.tags["service.name"]: t for t in traces}
    assert sorted(by_service) == ["app", "child"]
    assert by_service["app"].info.request_preview == '"From the parent"'
    assert by_service["child"].info.request_preview == '"From the child"'
    for trace in traces:
        assert sorted(str(s.span_type) for s in trace.data.spans) == ["AGENT", "LLM"]


# --- the app's stdio, exit code and failures ------------------------------------

LOUD_APP = """
    import sys

    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    received = sys.stdin.buffer.read()
    agent = Agent(TestModel(custom_output_text="echo ✓"), name="loud")
    answer = agent.run_sync("Echo what you got").output
    for i in range(3000):
        print(f"{i:04d} héllo wörld ✓ 日本語 🚀 {answer}")
    sys.stdout.flush()
    sys.stdout.buffer.write(b"raw bytes \\xff\\xfe\\x00 then stdin: " + received)
    sys.stdout.write("last line, no newline: ñ")
    sys.exit(3)
"""


def test_stdout_stdin_and_exit_code_pass_through_untouched(app: App) -> None:
    app.write(LOUD_APP)
    stdin = ("stdin line ü\n" * 2000).encode() + b"\x00\xff end"
    plain = app.run("python", "app.py", env=traced_env(app, PYTHONIOENCODING="utf-8"), launcher=False,
                    input=stdin)
    assert plain.returncode == 3, plain.stderr.decode()
    traced = app.run("python", "app.py", input=stdin,
                     env=traced_env(app, PYTHONIOENCODING="utf-8"))
    assert traced.returncode == 3, traced.stderr.decode()
    assert traced.stderr == b""
    assert traced.stdout == plain.stdout
    assert traced.stdout.endswith(b"then stdin: " + stdin + "last line, no newline: ñ".encode())
    assert traced.stdout.count("héllo wörld ✓ 日本語 🚀 echo ✓\n".encode()) == 3000
    assert only_trace(app).info.response_preview == '"echo ✓"'


def test_uncaught_exception_exits_1_with_traceback_and_an_error_trace(app: App) -> None:
    app.write("""
        from pydantic_ai import Agent
        from pydantic_ai.models.test import TestModel

        agent = Agent(TestModel(), name="crashing")

        @agent.tool_plain
        def explode(what: str) -> str:
            \"\"\"Always fails.\"\"\"
            raise RuntimeError(f"tool blew up on {what}")

        print("before the run", flush=True)
        agent.run_sync("Please explode")
        print("never printed")
    """)
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 1
    assert done.stdout == b"before the run\n"
    stderr = done.stderr.decode()
    assert stderr.startswith("Traceback (most recent call last):\n"), stderr
    assert stderr.endswith("RuntimeError: tool blew up on a\n"), stderr
    assert not traced_lines(done.stderr)

    trace = only_trace(app)
    assert str(trace.info.state).endswith("ERROR")
    kinds = spans_by_type(trace)
    (agent,) = kinds["AGENT"]
    (tool,) = kinds["TOOL"]
    assert agent.parent_id is None
    assert tool.parent_id == agent.span_id
    assert str(agent.status.status_code).endswith("ERROR")
    assert str(tool.status.status_code).endswith("ERROR")
    assert "tool blew up on a" in agent.status.description
    assert [e.attributes.get("exception.message") for e in tool.events if e.name == "exception"] == \
        ["tool blew up on a"]


# --- SIGTERM -------------------------------------------------------------------

SLEEPER_APP = """
    import signal
    import sys
    import time

    {before_import}
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    {after_import}
    agent = Agent(TestModel(custom_output_text="ran"), name="sleeper")
    agent.run_sync({prompt!r})
    print("ready", flush=True)
    time.sleep(120)
    print("slept through", flush=True)
"""

APP_HANDLER = """
def on_term(signum, frame):
    print("app handler", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
"""


def sleeper_app(prompt: str, handler: str = "none") -> str:
    """An app that runs an agent, says ready, sleeps; with its own SIGTERM
    handler installed ``before`` or ``after`` it imports pydantic_ai (that is,
    before or after traced-run installs its own)."""
    return textwrap.dedent(SLEEPER_APP).format(
        prompt=prompt,
        before_import=APP_HANDLER if handler == "before" else "",
        after_import=APP_HANDLER if handler == "after" else "",
    )


def terminate_when_ready(app: App, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[bytes], float]:
    """Start the app, SIGTERM it as soon as it says ready; returns its result and
    the seconds from the signal to its end."""
    process = subprocess.Popen([TRACED_RUN, "python", "app.py"], cwd=app.directory, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first == b"ready\n", (first, process.stderr.read() if process.stderr else b"")
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
        elapsed = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, first + out, err), elapsed


def test_sigterm_delivers_the_trace_then_dies_by_the_signal(app: App) -> None:
    # SIGTERM follows "ready" at once, mostly before the delivery thread's
    # first batch is due: the trace arrives because the signal flushed it.
    app.write(sleeper_app("Terminated after this"))
    done, elapsed = terminate_when_ready(app, traced_env(app, exit_timeout=str(SIGTERM_EXIT)))
    assert done.returncode == -signal.SIGTERM, done.stderr.decode()
    assert done.stdout == b"ready\n"
    assert done.stderr == b""
    print(f"SIGTERM: ended {elapsed:.2f}s after the signal")
    assert elapsed < SIGTERM_EXIT + MARGIN, elapsed
    assert only_trace(app).info.request_preview == '"Terminated after this"'


@pytest.mark.parametrize("handler", ["before", "after"], ids=["chained", "replacing-ours"])
def test_sigterm_runs_the_apps_own_handler_after_delivering(app: App, handler: str) -> None:
    app.write(sleeper_app("Handled termination", handler))
    done, elapsed = terminate_when_ready(app, traced_env(app, exit_timeout=str(SIGTERM_EXIT)))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"ready\napp handler\n"
    assert done.stderr == b""
    print(f"SIGTERM: ended {elapsed:.2f}s after the signal")
    assert elapsed < SIGTERM_EXIT + MARGIN, elapsed
    assert only_trace(app).info.request_preview == '"Handled termination"'


# --- MLflow down or hanging ------------------------------------------------------

DOWN_APP = """
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    agent = Agent(TestModel(custom_output_text="worked anyway"), name="unheard")
    print(agent.run_sync("Is anyone listening?").output, flush=True)
"""


@contextmanager
def hanging_mlflow() -> Iterator[int]:
    """A loopback port that accepts connections and never answers a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def hold() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield int(server.getsockname()[1])
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
        for connection in held:
            connection.close()


@dataclass
class Timed:
    done: subprocess.CompletedProcess[bytes]
    total: float
    """Seconds from start to end, as a user waiting for the command sees it."""
    exit_phase: float
    """Seconds from the app's last line of output to its end: what the exit costs,
    free of the import time a loaded machine stretches."""


def run_timed(app: App, env: dict[str, str], *, launcher: bool = True) -> Timed:
    argv = [TRACED_RUN, "python", "app.py"] if launcher else ["python", "app.py"]
    started = time.monotonic()
    process = subprocess.Popen(argv, cwd=app.directory, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        out = process.stdout.readline()
        last_line = time.monotonic()
        rest, err = process.communicate(timeout=120)
        ended = time.monotonic()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    done = subprocess.CompletedProcess(argv, process.returncode, out + rest, err)
    return Timed(done, ended - started, ended - last_line)


@pytest.fixture(scope="module")
def down_baseline(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Timed:
    """The same app under the launcher with tracing switched off."""
    app = App(tmp_path_factory.mktemp("baseline"), mlflow_server, "unused")
    app.write(DOWN_APP)
    timed = run_timed(app, clean_env(TRACED_RUN_ENABLED="false", MLFLOW_TRACKING_URI="http://127.0.0.1:9"))
    assert timed.done.returncode == 0, timed.done.stderr.decode()
    assert (timed.done.stdout, timed.done.stderr) == (b"worked anyway\n", b"")
    return timed


def _experiment_env(by: str) -> dict[str, str]:
    return {"MLFLOW_EXPERIMENT_NAME": "never-created"} if by == "name" else {"MLFLOW_EXPERIMENT_ID": "0"}


@pytest.mark.parametrize("by", ["name", "id"])
@pytest.mark.parametrize("mlflow", ["closed-port", "hanging"])
def test_mlflow_unreachable_costs_at_most_the_exit_bound(app: App, down_baseline: Timed, mlflow: str,
                                                        by: str, record_property: Any) -> None:
    app.write(DOWN_APP)
    with hanging_mlflow() if mlflow == "hanging" else _closed_port() as port:
        url = f"http://127.0.0.1:{port}"
        env = clean_env(MLFLOW_TRACKING_URI=url, TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT),
                        OTEL_EXPORTER_OTLP_TIMEOUT=POST_TIMEOUT,
                        TRACED_RUN_SPOOL_DIR=str(app.directory / "spool"), **_experiment_env(by))
        timed = run_timed(app, env)
    done = timed.done
    record_property("total_seconds", round(timed.total, 2))
    record_property("exit_seconds", round(timed.exit_phase, 2))
    print(f"{mlflow}/{by}: total {timed.total:.2f}s (untraced {down_baseline.total:.2f}s), "
          f"exit {timed.exit_phase:.2f}s (untraced {down_baseline.exit_phase:.2f}s)")
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"worked anyway\n"
    assert timed.exit_phase < down_baseline.exit_phase + EXIT_TIMEOUT + MARGIN, timed
    assert timed.total < down_baseline.total + EXIT_TIMEOUT + MARGIN, (timed, down_baseline)
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines == traced_lines(done.stderr), lines
    # The reason is the network's, short, whether the post or the experiment lookup met it.
    # A post that went out unanswered may have been stored: it is said as sent, not as undelivered.
    reason = r" \(connection refused\)" if mlflow == "closed-port" else \
        r"( \(no answer (from MLflow )?within [^)]+\)|: no answer within [\d.]+ s; .* re-sending is safe)"
    assert re.match(rf"traced-run: 2 spans of 1 trace (not delivered|sent) to {re.escape(url)}/v1/traces"
                    rf"{reason}", lines[0]), lines[0]
    assert lines[0].count(url) == 1, lines[0]


@contextmanager
def _closed_port() -> Iterator[int]:
    yield free_port()


def test_sigterm_with_mlflow_hanging_still_ends_within_the_bound(app: App) -> None:
    app.write(sleeper_app("Nobody answers"))
    with hanging_mlflow() as port:
        url = f"http://127.0.0.1:{port}"
        env = clean_env(MLFLOW_TRACKING_URI=url, MLFLOW_EXPERIMENT_ID="0",
                        TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT), OTEL_EXPORTER_OTLP_TIMEOUT=POST_TIMEOUT,
                        TRACED_RUN_SPOOL_DIR=str(app.directory / "spool"))
        done, elapsed = terminate_when_ready(app, env)
    print(f"SIGTERM, MLflow hanging: ended {elapsed:.2f}s after the signal")
    assert done.returncode == -signal.SIGTERM
    assert done.stdout == b"ready\n"
    assert elapsed < EXIT_TIMEOUT + MARGIN, elapsed
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert re.match(r"traced-run: 2 spans of 1 trace (not delivered|sent) to", lines[0]), lines
