"""How a run ended, told truly: a run the app leaves on purpose (a ``break`` out of
a stream once it has the first text, an ``iter`` loop stopped at the first tool
call) arrives OK, every span OK, with the output it had; a run cancelled from outside arrives ERROR; and
every ERROR span says why in its status (a ModelRetry's text, ``interrupted: ...``
for a tool cut off), not only in an event."""

from __future__ import annotations

from typing import Any

from conftest import App, poll, traced_env

APP = """
    import asyncio

    from pydantic_ai import Agent, ModelRetry
    from pydantic_ai.models.function import FunctionModel
    from pydantic_ai.models.test import TestModel


    async def words(messages, info):
        for word in ("first ", "second ", "third"):
            yield word


    streamer = Agent(FunctionModel(stream_function=words), name="streamer")
    stepper = Agent(TestModel(), name="stepper")
    retrier = Agent(TestModel(), name="retrier")
    held = Agent(TestModel(), name="held")
    calls = []


    @stepper.tool_plain
    def lookup(city: str) -> str:
        \"\"\"Look a city up.\"\"\"
        return f"{city}: sunny"


    @retrier.tool_plain
    def flaky(city: str) -> str:
        \"\"\"Fails the first time.\"\"\"
        calls.append(city)
        if len(calls) == 1:
            raise ModelRetry("flaky failed, call me again")
        return f"{city}: fine"


    async def main():
        entered = asyncio.Event()

        @held.tool_plain
        async def wait_for_ever(city: str) -> str:
            \"\"\"Never comes back.\"\"\"
            entered.set()
            await asyncio.sleep(600)
            return city

        async with streamer.run_stream("Stream until the first text") as streamed:
            async for text in streamed.stream_text(delta=True, debounce_by=None):
                print("first text:", text.strip(), flush=True)
                break
        async with stepper.iter("Step to the first tool call") as run:
            async for node in run:
                if Agent.is_call_tools_node(node):
                    break
        print((await retrier.run("Retry the flaky tool")).output, flush=True)
        task = asyncio.create_task(held.run("Cancel me from outside"))
        await entered.wait()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            print("cancelled", flush=True)


    asyncio.run(main())
"""


def _traces(app: App) -> dict[str, Any]:
    """The app's four traces, by the name of their agent, once MLflow has all complete."""

    def complete() -> dict[str, Any] | None:
        experiment_id = app.server.experiment_id(app.experiment)
        found = app.server.traces(experiment_id) if experiment_id else []
        done = [trace for trace in found if str(trace.info.state).endswith(("OK", "ERROR"))]
        return {_agent(trace).name.removeprefix("invoke_agent "): trace for trace in done} \
            if len(done) == 4 else None

    traces: dict[str, Any] = poll(complete, timeout=60, what="four complete traces")
    return traces


def _agent(trace: Any) -> Any:
    return next(span for span in trace.data.spans if span.name.startswith("invoke_agent "))


def _status(span: Any) -> tuple[str, str]:
    return str(span.status.status_code).rpartition(".")[2], span.status.description


def test_runs_left_on_purpose_are_ok_and_error_spans_say_why(app: App) -> None:
    app.write(APP)
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines()[0] == "first text: first"
    assert b"traced-run:" not in done.stderr, done.stderr.decode()
    traces = _traces(app)

    for name in ("streamer", "stepper"):
        trace = traces[name]
        assert str(trace.info.state).endswith("OK"), (name, trace.info.state)
        assert {span.name: _status(span) for span in trace.data.spans if _status(span)[0] != "OK"} == {}, name
    assert "Stream until the first text" in str(traces["streamer"].info.request_preview)
    # The output it had: what the model had answered when the app stopped reading.
    assert "first" in str(traces["streamer"].info.response_preview), traces["streamer"].info
    stepped = [span.name for span in traces["stepper"].data.spans]
    assert "execute_tool lookup" not in stepped, stepped  # stopped before the tool ran

    retried = traces["retrier"]
    assert str(retried.info.state).endswith("OK"), retried.info.state
    flaky = [_status(span) for span in retried.data.spans if span.name == "execute_tool flaky"]
    assert sorted(flaky) == [("ERROR", "ToolRetryError: flaky failed, call me again"), ("OK", "")], flaky

    cancelled = traces["held"]
    assert str(cancelled.info.state).endswith("ERROR"), cancelled.info.state
    assert _status(_agent(cancelled)) == ("ERROR", "interrupted: CancelledError")
    (tool,) = [span for span in cancelled.data.spans if span.name == "execute_tool wait_for_ever"]
    assert _status(tool) == ("ERROR", "interrupted: CancelledError")
