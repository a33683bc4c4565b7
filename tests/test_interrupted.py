"""A process that leaves in the middle of an agent run (SIGTERM from a rolling
deploy, a normal exit while a daemon thread still runs an agent) leaves a
complete trace in MLflow, in state ERROR, its open spans ended with a status
that says why, its root showing the prompt: not a trace IN_PROGRESS for ever."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

from conftest import TRACED_RUN, App, poll, traced_env

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


def _wait_complete(app: App) -> Any:
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
    _assert_cut_off(_wait_complete(app), "SIGTERM")


def test_exit_with_an_agent_still_running_in_a_daemon_thread_leaves_a_complete_error_trace(app: App) -> None:
    app.write(STUCK_IN_A_TOOL)
    done = app.run("python", "app.py", "daemon", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"in the tool\n"
    assert b"traced-run:" not in done.stderr, done.stderr.decode()
    _assert_cut_off(_wait_complete(app), "process exit")
