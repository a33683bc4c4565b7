"""Recovery after a crash, against the real MLflow: a DBOS workflow (SQLite system database) whose
process is killed with SIGKILL in the middle of a tool, after the run's ended spans reached MLflow
(an IN_PROGRESS trace), then recovered by a second traced process. MLflow ends with the recovered
run as one complete trace tagged as recovered, the killed run's trace ended as ERROR
("interrupted") by the second process, both in one session, for both of pydantic-ai's DBOS set-ups
(``DBOSAgent`` and the ``DBOSDurability`` capability)."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from typing import Any

import pytest
from conftest import TRACED_RUN, App, poll, traced_env

pytest.importorskip("dbos")

PROMPT = "What is the weather in Paris?"

DBOS_APP = """
    import asyncio
    import os
    import pathlib
    import time
    import warnings

    from dbos import DBOS, SetWorkflowID
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    warnings.simplefilter("ignore")  # DBOSAgent's deprecation, on stderr where the test reads
    DBOS(config={"name": "recovery", "system_database_url": f"sqlite:///{os.path.abspath('dbos.sqlite')}"})
    if os.environ["KIND"] == "DBOSAgent":
        from pydantic_ai.durable_exec.dbos import DBOSAgent

        base = Agent(TestModel(), name="support")
    else:
        from pydantic_ai.durable_exec.dbos import DBOSDurability

        base = Agent(TestModel(), name="support", capabilities=[DBOSDurability()])

    @base.tool_plain
    def lookup(city: str) -> str:
        \"\"\"Look a city up.\"\"\"
        pathlib.Path("tool-started").write_text(str(os.getpid()))
        while not pathlib.Path("gate").exists():  # the test kills the first process here
            time.sleep(0.05)
        return f"{city}: sunny"

    agent = DBOSAgent(base) if os.environ["KIND"] == "DBOSAgent" else base

    @DBOS.workflow()
    async def support(prompt: str) -> str:
        return (await agent.run(prompt)).output

    async def main() -> None:
        DBOS.launch()  # recovers the workflows a killed process left
        if os.environ["ROLE"] == "start":
            with SetWorkflowID(os.environ["WORKFLOW_ID"]):
                print(await support(PROMPT))
        else:
            handle = await DBOS.retrieve_workflow_async(os.environ["WORKFLOW_ID"])
            print(await handle.get_result())
        DBOS.destroy()

    if __name__ == "__main__":
        asyncio.run(main())
""".replace("PROMPT)", f"{PROMPT!r})")


def _state(trace: Any) -> str:
    return str(trace.info.state).rpartition(".")[2]


def _root(trace: Any) -> Any:
    (root,) = [span for span in trace.data.spans if span.parent_id is None]
    return root


@pytest.mark.parametrize("kind", ["DBOSAgent", "DBOSDurability"])
def test_a_dbos_workflow_killed_mid_tool_and_recovered_is_one_recovered_trace(app: App, kind: str) -> None:
    app.write(DBOS_APP)
    env = traced_env(app, KIND=kind, WORKFLOW_ID=uuid.uuid4().hex)
    first = subprocess.Popen([TRACED_RUN, "python", "app.py"], cwd=app.directory,
                             env={**env, "ROLE": "start"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        started = app.directory / "tool-started"
        poll(lambda: started.exists() and started.read_text(), timeout=60, what="the tool to start")
        experiment = poll(lambda: app.server.experiment_id(app.experiment), timeout=30, what="the experiment")
        # The run's ended spans (its first model call) reach MLflow before the run ends.
        (left,) = poll(lambda: app.server.traces(experiment), timeout=30, what="the run's first spans")
        assert _state(left) == "IN_PROGRESS"
        os.kill(int(started.read_text()), signal.SIGKILL)
        first.communicate(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    (app.directory / "gate").touch()
    recovered = app.run("python", "app.py", env={**env, "ROLE": "recover"}, timeout=120)
    assert recovered.returncode == 0, recovered.stderr.decode()[-3000:]
    assert b"sunny" in recovered.stdout

    traces = app.traces(2)  # both complete: none is left IN_PROGRESS
    by_state = {_state(trace): trace for trace in traces}
    assert sorted(by_state) == ["ERROR", "OK"]
    run, killed = by_state["OK"], by_state["ERROR"]
    assert killed.info.trace_id == left.info.trace_id, "the killed run's trace was ended, not another made"
    assert run.info.tags.get("traced_run.recovered") == "true"
    assert "traced_run.recovered" not in killed.info.tags
    assert _root(run).name == _root(killed).name == "invoke_agent support"
    assert _root(killed).status.description == "interrupted: the process ended before this span did"
    for trace in traces:
        assert str(trace.info.request_preview) == f'"{PROMPT}"'
        assert trace.info.tags.get("mlflow.traceName") == "support"
    assert [str(span.span_type) for span in run.data.spans].count("TOOL") == 1
    assert str(run.info.response_preview) != ""
    session = run.info.trace_metadata.get("mlflow.trace.session")
    assert session and killed.info.trace_metadata.get("mlflow.trace.session") == session
