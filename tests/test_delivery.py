"""Delivery you can trust (issue 3), against the real MLflow server with a
fault-injecting proxy in front of it (tests/support/faultproxy.py): no trace lost, none
twice, no process held, every worker traced.

Counts are exact: every app prompt carries its own number, so each test knows
which runs it made and checks that MLflow holds exactly those traces, each
once, each with all its spans. MLflow is polled with a deadline, never waited
for with a sleep. Each test has its own spool directory.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import (
    GENEROUS_EXIT,
    App,
    free_port,
    poll,
    request,
    serving,
    traced_env,
)
from support.faultproxy import FaultProxy, Mode
from support.launched import (
    EXIT_TIMEOUT,
    NOT_WAITING,
    POST_TIMEOUT,
    RUN_SPANS,
    Lines,
    finished,
    flush,
    loop_app,
    proxied_env,
    run_numbers,
    span_counts,
    spool_of,
    spooled,
    start,
    stop,
    tool_agent,
    trace_infos,
    traced_lines,
    wait_runs,
)

from traced_run.delivery import OUTAGE_NOTICE


@contextlib.contextmanager
def delivering_app(app: App, proxy: FaultProxy, prefix: str, *, pause: float = 0.2,
                   **env: str) -> Iterator[tuple[subprocess.Popen[bytes], Lines]]:
    """A looping app that has made its first runs and delivered a first batch (so its
    experiment is known before MLflow fails); stopped on the way out."""
    app.write(loop_app(prefix, pause=pause))
    process = start(app, "python", "app.py", env=proxied_env(app, proxy, **env))
    try:
        out = Lines(process)
        out.wait_for("done 2")
        poll(lambda: 200 in proxy.statuses(), timeout=30, what="a first batch delivered")
        yield process, out
    finally:
        stop(process)


# --- MLflow down, failing, recovering ---------------------------------------------------
def test_down_for_the_first_process_up_for_the_second(app: App, proxy: FaultProxy) -> None:
    app.write(tool_agent("first", "agent.run_sync('updown 0')\nagent.run_sync('updown 1')\n"), "first.py")
    app.write(tool_agent("second", "agent.run_sync('updown 2')\n"), "second.py")
    spool = spool_of(app)
    proxy.mode = "refuse"
    started = time.monotonic()
    env = proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT))
    first = app.run("python", "first.py", env=env)
    elapsed = time.monotonic() - started
    print(f"first process, MLflow refused: {elapsed:.2f}s; {first.stderr.decode().strip()}")
    assert first.returncode == 0, first.stderr.decode()
    lines = first.stderr.decode().splitlines()
    assert lines == traced_lines(first.stderr) and len(lines) == 1, lines
    assert f"8 spans of 2 traces not delivered to {proxy.url}/v1/traces" in lines[0], lines
    assert f"kept in {spool};" in lines[0], lines
    assert spooled(spool), "nothing spooled"
    assert proxy.count(path="/") == 0

    proxy.mode = "forward"
    second = app.run("python", "second.py", env=proxied_env(app, proxy))
    assert second.returncode == 0, second.stderr.decode()
    assert second.stderr == b""
    wait_runs(app.server, app.experiment, "updown", 3)
    assert span_counts(app.server, app.experiment) == [RUN_SPANS] * 3
    assert spooled(spool) == []


FAILURES: list[Mode] = ["503", "429", "hang", "cut"]


def all_runs_arrive_then_stop(app: App, process: subprocess.Popen[bytes], out: Lines, prefix: str,
                              since: float) -> tuple[float, bytes]:
    """Every run the app has done so far reaches MLflow (spooled ones sent again) before it
    ends: seconds from ``since`` until they all had; then the app is stopped: its stderr."""
    done = out.done()
    poll(lambda: set(range(done)) <= set(run_numbers(
        [i for i in trace_infos(app.server, app.experiment) if finished(i)], prefix)),
        timeout=60, what=f"runs 0..{done - 1} sent again while the app runs")
    arrived = time.monotonic() - since
    assert process.poll() is None, "the app ended before its spool was sent"
    (app.directory / "stop").touch()
    return arrived, out.finish(timeout=90)


@pytest.mark.parametrize("failure", FAILURES)
def test_failing_mid_run_then_recovering_loses_nothing_and_doubles_nothing(
        app: App, proxy: FaultProxy, failure: Mode) -> None:
    # A one-second attempt timeout keeps a hanging MLflow from holding the delivery thread long.
    with delivering_app(app, proxy, "run", OTEL_EXPORTER_OTLP_TIMEOUT="1") as (process, out):
        proxy.mode = failure
        poll(lambda: proxy.count(mode=failure) >= 2, timeout=30, what=f"two posts answered {failure}")
        proxy.mode = "forward"
        # While the app still runs, this process sends what it spooled during the failure.
        resent_after, err = all_runs_arrive_then_stop(app, process, out, "run", time.monotonic())
    runs = out.done()
    print(f"{failure}: {proxy.count(mode=failure)} posts failed, {runs} runs, spool re-sent "
          f"{resent_after:.1f}s after recovery; stderr: {err.decode()}")
    assert process.returncode == 0, err.decode()
    assert out.lines[-1] == "stopped"
    wait_runs(app.server, app.experiment, "run", runs)
    assert span_counts(app.server, app.experiment) == [RUN_SPANS] * runs
    assert spooled(spool_of(app)) == []
    # The failure was shorter than OUTAGE_NOTICE: one line, at exit; all was sent later.
    (summary,) = err.decode().splitlines()
    assert re.fullmatch(rf"traced-run: \d+ spans were spooled while {proxy.url}/v1/traces did not take them "
                        r"\(.+\) and sent later", summary), summary


OUTAGE = 6.0
"""Seconds MLflow fails in the recovery test: long enough for the back-off to reach its cap."""


def test_a_running_process_finds_mlflow_again_and_asks_little_meanwhile(
        app: App, proxy: FaultProxy) -> None:
    """A long-running service: while MLflow answers 503 it is asked at most about once a
    second; once it answers again, the process finds it and sends, spool included (how soon:
    the back-off's cap of 1 s, tests/unit/test_delivery_parts.py; the seconds a loaded machine
    adds are the benchmarks' to measure)."""
    with delivering_app(app, proxy, "back", pause=0.1) as (process, out):
        proxy.mode = "503"
        time.sleep(OUTAGE)  # the outage itself: what is measured is the process's behaviour in it
        asked = proxy.count(path="/", mode="503")
        proxy.mode = "forward"
        back = time.monotonic()
        seen = len(proxy.seen)
        poll(lambda: any(s.status == 200 and s.path.startswith("/v1/traces") for s in proxy.seen[seen:]),
             timeout=30, what="a batch delivered after MLflow came back")
        found_after = time.monotonic() - back
        drained_after, err = all_runs_arrive_then_stop(app, process, out, "back", back)
    print(f"recovery: {asked} requests in a {OUTAGE:g}s outage; first batch {found_after:.2f}s after "
          f"MLflow was back, the outage's runs all there after {drained_after:.2f}s; stderr: {err.decode()}")
    # An upper bound on a count: a loaded machine makes fewer requests, never more.
    assert asked <= OUTAGE / 1.0 + 3, f"{asked} requests while MLflow was down"
    # Found again at all is the poll above (its deadline stops a hang, nothing more).
    assert spooled(spool_of(app)) == []


ASKED_WAIT = 4
"""Seconds the proxy's 503 asks the client to wait (``Retry-After``)."""


def test_retry_after_is_honoured_while_running(app: App, proxy: FaultProxy) -> None:
    """A 503 with ``Retry-After``: the process asks again no sooner than it was told, not at its
    own quarter-second back-off, and loses nothing meanwhile."""
    with delivering_app(app, proxy, "asked", pause=0.1) as (process, out):
        proxy.retry_after = str(ASKED_WAIT)
        proxy.mode = "503"
        first = poll(lambda: next((s for s in proxy.seen if s.mode == "503"), None), timeout=30,
                     what="a post answered 503")
        proxy.mode = "forward"
        after = poll(lambda: next((s for s in proxy.seen if s.path.startswith("/v1/traces")
                                   and s.at > first.at), None), timeout=30, what="the next post")
        _, err = all_runs_arrive_then_stop(app, process, out, "asked", time.monotonic())
    waited = after.at - first.at
    print(f"asked to wait {ASKED_WAIT} s, asked again after {waited:.2f} s; stderr: {err.decode()}")
    # A lower bound only: a loaded machine makes the wait longer, never shorter.
    assert waited >= ASKED_WAIT - 0.2, f"asked again {waited:.2f} s after a {ASKED_WAIT} s Retry-After"
    assert spooled(spool_of(app)) == []


def test_a_retry_after_within_the_exit_bound_is_waited_out_and_the_run_delivered(
        app: App, proxy: FaultProxy) -> None:
    """At exit, a 503 whose ``Retry-After`` ends within the exit bound: the process waits it out,
    asks once more, and its run reaches MLflow; the exit line says it was sent late, not lost."""
    app.write(tool_agent("briefly", "agent.run_sync('briefly 0')\n"))
    proxy.retry_after = "2"
    proxy.mode = "503"
    env = proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT=str(GENEROUS_EXIT))

    def back_once_asked() -> Any:
        """MLflow is back as soon as it has asked for the wait: the next post must go through."""
        asked = poll(lambda: next((s for s in proxy.seen if s.mode == "503"), None), timeout=90,
                     what="a post answered 503")
        proxy.mode = "forward"
        return asked

    with ThreadPoolExecutor(1) as pool:
        answered = pool.submit(back_once_asked)
        done = app.run("python", "app.py", env=env)
        first = answered.result()
    assert done.returncode == 0, done.stderr.decode()
    # The 503 is worth a word, but nothing is said lost or left behind.
    (line,) = traced_lines(done.stderr)
    assert f"{RUN_SPANS} spans were spooled while" in line and "answered 503" in line, line
    assert line.endswith("and sent later"), line
    later = [s for s in proxy.seen if s.at > first.at]
    assert later and later[0].mode == "forward", proxy.seen
    assert later[0].at - first.at >= 2 - 0.2, "asked again before the Retry-After ran out"
    assert spooled(spool_of(app)) == []
    wait_runs(app.server, app.experiment, "briefly", 1)


def test_a_retry_after_beyond_the_exit_bound_is_not_waited_for_and_is_said(
        app: App, proxy: FaultProxy) -> None:
    app.write(tool_agent("asked", "agent.run_sync('asked 0')\n"))
    proxy.retry_after = "60"
    proxy.mode = "503"
    env = proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT))
    started = time.monotonic()
    done = app.run("python", "app.py", env=env)
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr.decode()
    # Waiting out the 60 s MLflow asked for would cross it; start-up, one run and a 2 s exit on a
    # loaded machine stay far under it.
    assert took < 45, f"the exit took {took:.1f} s"
    (line,) = traced_lines(done.stderr)
    assert f"{RUN_SPANS} spans of 1 trace not delivered to {proxy.url}/v1/traces" in line, line
    assert "it asks to be retried in 60 s" in line, line
    assert proxy.count(path="/", mode="503") == 1, "asked again after being told to wait 60 s"
    assert spooled(spool_of(app))
    proxy.mode = "forward"
    flush(app, env)
    wait_runs(app.server, app.experiment, "asked", 1)


@pytest.mark.parametrize("recovers", [True, False], ids=["recovers", "still-down-at-exit"])
def test_long_outage_is_said_while_running_and_at_exit_only_if_something_is_left(
        app: App, proxy: FaultProxy, recovers: bool) -> None:
    """A service that never exits must learn of an outage while it runs; the
    exit line then adds only what is still not delivered."""
    app.write(loop_app("long"))
    spool = spool_of(app)
    env = proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT))
    process = start(app, "python", "app.py", env=env)
    try:
        out, said = Lines(process), Lines(process, process.stderr)
        out.wait_for("done 1")
        proxy.mode = "refuse"
        refused = time.monotonic()
        notice = said.first("traced-run:", timeout=OUTAGE_NOTICE + 30)
        noticed_after = time.monotonic() - refused
        if recovers:
            proxy.mode = "forward"
            recovered_at = out.done()
            poll(lambda: set(range(recovered_at)) <= set(run_numbers(
                [i for i in trace_infos(app.server, app.experiment) if finished(i)], "long")),
                timeout=60, what=f"runs 0..{recovered_at - 1} sent again while the app runs")
        (app.directory / "stop").touch()
        process.wait(timeout=60)
        lines = said.ended(timeout=10)
        runs = len([line for line in out.ended(timeout=10) if line.startswith("done ")])
    finally:
        stop(process)
    print(f"outage said {noticed_after:.1f}s after MLflow went down; {runs} runs; stderr: {lines}")
    assert process.returncode == 0, lines
    # A lower bound only (not said before the outage lasted OUTAGE_NOTICE); that it was said at
    # all is said.first's, whose deadline stops a hang.
    assert noticed_after >= OUTAGE_NOTICE, noticed_after
    assert re.fullmatch(rf"traced-run: cannot deliver traces to {re.escape(proxy.url)}/v1/traces since "
                        rf"\d\d:\d\d:\d\d \(connection refused\); keeping them in {re.escape(str(spool))} "
                        r"and retrying in the background", notice), notice
    if recovers:
        assert lines == [notice]
    else:
        assert len(lines) == 2 and lines[0] == notice, lines
        kept = rf"/v1/traces \(connection refused\): kept in {re.escape(str(spool))}; .*"
        summary = rf"traced-run: \d+ spans of \d+ traces? not delivered to {re.escape(proxy.url)}{kept}"
        assert re.fullmatch(summary, lines[1]), lines
        proxy.mode = "forward"
        flush(app, proxied_env(app, proxy))
    wait_runs(app.server, app.experiment, "long", runs)
    assert spooled(spool) == []


def test_exit_line_counts_only_this_processs_own_spans(app: App, proxy: FaultProxy) -> None:
    """A process that sends an earlier process's spooled batches, then has to
    spool its own, says its own are kept: what it sent of others' is not
    subtracted from them, nor reported (the earlier process said where they were)."""
    app.write(tool_agent("first", "agent.run_sync('mine 0')\nagent.run_sync('mine 1')\n"), "first.py")
    app.write(tool_agent("second", """
    import os
    import time

    while not os.path.exists("go"):  # the test lets it run once MLflow refuses again
        time.sleep(0.05)
    agent.run_sync("mine 2")
    """), "second.py")
    spool = spool_of(app)
    env = proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT))
    proxy.mode = "refuse"
    first = app.run("python", "first.py", env=env)
    assert first.returncode == 0, first.stderr.decode()
    assert spooled(spool)

    proxy.mode = "forward"
    second = start(app, "python", "second.py", env=env)
    try:
        wait_runs(app.server, app.experiment, "mine", 2)  # sent from the spool by the second process
        assert spooled(spool) == []
        proxy.mode = "refuse"
        (app.directory / "go").touch()
        second.wait(timeout=60)
        assert second.stderr is not None
        err = second.stderr.read().decode()
    finally:
        stop(second)
    assert second.returncode == 0, err
    assert err.splitlines() == [
        f"traced-run: {RUN_SPANS} spans of 1 trace not delivered to {proxy.url}/v1/traces "
        f"(connection refused): kept in {spool}; the next traced process or `traced-run flush` sends them"]
    proxy.mode = "forward"
    flush(app, env)
    wait_runs(app.server, app.experiment, "mine", 3)


def test_a_batch_sent_twice_is_stored_once(app: App, proxy: FaultProxy) -> None:
    app.write(tool_agent("twice", "agent.run_sync('twice 0')\n"))
    spool = spool_of(app)
    proxy.mode = "refuse"
    done = app.run("python", "app.py", env=proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT)))
    assert done.returncode == 0, done.stderr.decode()
    batches = spooled(spool)
    assert batches
    copies = app.directory / "copies"
    copies.mkdir()
    for batch in batches:
        shutil.copy2(batch, copies / batch.name)

    proxy.mode = "forward"
    sent = f"sent {len(batches)} {'batch' if len(batches) == 1 else 'batches'} ({RUN_SPANS} spans)"
    assert flush(app, proxied_env(app, proxy)).startswith(sent)
    assert spooled(spool) == []
    (first,) = wait_runs(app.server, app.experiment, "twice", 1)
    assert span_counts(app.server, app.experiment) == [RUN_SPANS]
    posts = proxy.count()

    for copy in copies.iterdir():
        shutil.copy2(copy, spool / copy.name)
    assert flush(app, proxied_env(app, proxy)).startswith(sent)
    assert spooled(spool) == []
    assert proxy.count() == posts + len(batches)
    assert proxy.statuses()[-len(batches):] == [200] * len(batches)
    (again,) = wait_runs(app.server, app.experiment, "twice", 1)
    assert again.trace_id == first.trace_id
    assert span_counts(app.server, app.experiment) == [RUN_SPANS]


BURST_TOOLS = 8
BURST_RUN_SPANS = 3 + BURST_TOOLS
"""agent, 2 model requests, one span per tool (TestModel calls every tool once)."""
BURST_RUNS = 220
"""220 runs of 11 spans: 2420 spans, more than the default queue (2048 spans) holds."""
BURST_APP = """
    import time


    def add_tool(k: int) -> None:
        def tool(x: int) -> str:
            return f"tool {{k}}: {{x}}"

        tool.__name__ = f"tool_{{k}}"
        agent.tool_plain(tool)


    for k in range({tools} - 1):
        add_tool(k)
    started = time.monotonic()
    for i in range({runs}):
        agent.run_sync(f"{prefix} {{i}}")
        if i % 10 == 0:
            print(f"done {{i}}", flush=True)
    print(f"{{time.monotonic() - started:.1f}}s", flush=True)
"""


def burst_through_a_hang(app: App, proxy: FaultProxy, prefix: str, runs: int,
                         let_go_after: int) -> tuple[Lines, bytes]:
    """The burst app, ``runs`` runs of BURST_RUN_SPANS spans, while MLflow
    hangs until run ``let_go_after`` is done; its stdout and stderr. The post
    that hangs is held until the proxy lets it go, so the queue holds every
    span made meanwhile."""
    app.write(tool_agent(prefix, BURST_APP.format(tools=BURST_TOOLS, runs=runs, prefix=prefix)))
    experiment_id = app.server.client().create_experiment(app.experiment)
    env = proxied_env(app, proxy, MLFLOW_EXPERIMENT_ID=str(experiment_id), TRACED_RUN_EXIT_TIMEOUT="120",
                      OTEL_EXPORTER_OTLP_TIMEOUT="120")
    del env["MLFLOW_EXPERIMENT_NAME"]
    proxy.mode = "hang"
    process = start(app, "python", "app.py", env=env)
    try:
        out = Lines(process)
        out.wait_for(f"done {let_go_after}", timeout=120)
        proxy.mode = "forward"
        err = out.finish(timeout=240)
    finally:
        stop(process)
    assert process.returncode == 0, err.decode()
    return out, err


def test_burst_larger_than_the_queue_arrives_whole(app: App, proxy: FaultProxy) -> None:
    """As fast as the app can, while MLflow takes no batch (it hangs) for the
    first part: the delivery thread waits on one post while the queue passes
    half its bound (11 * 151 = 1661 spans of 2048: over half, not full); then
    batches go to the spool (MLflow failed, or the queue is high) and from
    there to MLflow when it answers again, by this process."""
    started = time.monotonic()
    out, err = burst_through_a_hang(app, proxy, "burst", BURST_RUNS, 150)
    ended = time.monotonic() - started
    infos = wait_runs(app.server, app.experiment, "burst", BURST_RUNS, timeout=120)
    arrived = time.monotonic() - started
    print(f"burst: {BURST_RUNS * BURST_RUN_SPANS} spans made in {out.lines[-1]}, process ended after "
          f"{ended:.1f}s, all {BURST_RUNS} traces in MLflow after {arrived:.1f}s; stderr: {err.decode()}")
    client = app.server.client()
    for info in infos[:: BURST_RUNS // 5]:  # all spans of a sample: fetching all 220 takes a minute here
        assert len(client.get_trace(info.trace_id).data.spans) == BURST_RUN_SPANS
    (line,) = err.decode().splitlines()
    assert re.fullmatch(r"traced-run: \d+ spans were spooled while .* and sent later", line), line
    assert spooled(spool_of(app)) == []


def test_queue_full_while_a_post_hangs_spools_rather_than_drops(app: App, proxy: FaultProxy) -> None:
    """The issue's "overflow goes to the spool, not to the floor", when the one
    delivery thread is held by a post: 250 runs of 11 spans, the hanging post
    let go only after 240 of them, so the queue must pass 2048 spans."""
    _, err = burst_through_a_hang(app, proxy, "flood", 250, 240)
    print(f"flood: {err.decode()}")
    assert "dropped" not in err.decode(), err.decode()
    wait_runs(app.server, app.experiment, "flood", 250, timeout=120)


BUSY_APP = """
    import json
    import os
    import time

    def children():
        \"\"\"Processes whose parent is this one.\"\"\"
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    if stat.read().rsplit(")", 1)[1].split()[1] == str(os.getpid()):
                        found.append(int(pid))
            except OSError:  # ended meanwhile
                pass
        return found

    seen, i, started = set(), 0, time.monotonic()
    while i < 300 or time.monotonic() < started + 3:
        agent.run_sync(f"busy {i}")
        i += 1
        if i % 25 == 0:
            seen.update(children())
    print(json.dumps({"runs": i, "spans_per_s": 4 * i / (time.monotonic() - started),
                      "children": sorted(seen)}))
"""


def test_a_busy_process_starts_no_process_and_loses_nothing(app: App) -> None:
    """Hundreds of spans a second for seconds: the app's own process does all the delivery
    work (no helper process, ever), stdout is the app's and every run arrives whole."""
    app.write(tool_agent("busy", BUSY_APP))
    done = app.run("python", "app.py", env=traced_env(app))
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()
    (line,) = done.stdout.decode().splitlines()
    seen = json.loads(line)
    print(f"busy: {seen['runs']} runs, {seen['spans_per_s']:.0f} spans a second")
    assert seen["children"] == [], seen
    wait_runs(app.server, app.experiment, "busy", seen["runs"], timeout=180)


# --- invalid batches, the spool's bound and permissions --------------------------------
def test_batch_mlflow_rejects_is_set_aside_not_retried(app: App, proxy: FaultProxy) -> None:
    app.write(tool_agent("nowhere", "agent.run_sync('nowhere 0')\n"))
    env = proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT))
    del env["MLFLOW_EXPERIMENT_NAME"]
    env["MLFLOW_EXPERIMENT_ID"] = "987654"
    started = time.monotonic()
    done = app.run("python", "app.py", env=env)
    elapsed = time.monotonic() - started
    print(f"rejected batch: exit after {elapsed:.2f}s; stderr: {done.stderr.decode().strip()}")
    assert done.returncode == 0, done.stderr.decode()
    assert elapsed < 30
    assert proxy.statuses() == [404], "the rejected batch was posted again"
    rejected = spool_of(app) / "rejected"
    (aside,) = sorted(rejected.glob("*.otlp"))
    reason = aside.with_suffix(".reason.txt")
    assert reason.read_text().startswith("HTTP 404"), reason.read_text()
    assert b"nowhere 0" in aside.read_bytes()
    assert spooled(spool_of(app)) == []
    for path in (aside, reason):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(rejected.stat().st_mode) == 0o700
    lines = done.stderr.decode().splitlines()
    assert lines == traced_lines(done.stderr) and len(lines) == 1, lines
    said = f"traced-run: {RUN_SPANS} spans rejected by MLflow (HTTP 404), set aside in {rejected}"
    assert lines == [said], lines

    # Nor does a later flush.
    assert flush(app, env).startswith("sent 0 batches")
    assert proxy.statuses() == [404]


CONCURRENT_RUNS = """
    import asyncio

    async def main() -> None:
        await asyncio.gather(*(agent.run(prompt) for prompt in ("good 0", "poison 1", "good 2")))

    asyncio.run(main())
"""


def test_a_batch_with_a_trace_mlflow_rejects_loses_only_that_trace(app: App, proxy: FaultProxy) -> None:
    """Three runs at once end in one batch or, when the batch timer falls between their
    spans, two; MLflow refuses any request that holds the poisoned one. Posted again trace
    by trace, once: the two good runs arrive, the poisoned one alone is set aside."""
    app.write(tool_agent("mixed", CONCURRENT_RUNS))
    proxy.reject = b"poison 1"
    done = app.run("python", "app.py", env=proxied_env(app, proxy))
    assert done.returncode == 0, done.stderr.decode()
    rejected = spool_of(app) / "rejected"
    aside = [path.read_bytes() for path in sorted(rejected.glob("*.otlp"))]
    assert aside and all(b"poison 1" in batch and b"good" not in batch for batch in aside)
    counts = [json.loads(batch.split(b"\n", 1)[0]) for batch in aside]
    assert sum(count["spans"] for count in counts) == RUN_SPANS
    assert all(count["traces"] == 1 for count in counts), counts
    # Each batch whole; once per process, a batch uncompressed (a 400 may be an MLflow that
    # cannot read gzip: export tries that once); then the poisoned trace alone: nothing more.
    assert 3 <= proxy.statuses().count(400) <= 2 * len(aside) + 1, proxy.statuses()
    (line,) = done.stderr.decode().splitlines()
    assert re.fullmatch(rf"traced-run: {RUN_SPANS} spans rejected by MLflow \(HTTP 400\), set aside in "
                        rf"{re.escape(str(rejected))}", line), line
    poll(lambda: run_numbers([i for i in trace_infos(app.server, app.experiment) if finished(i)], "good")
         == [0, 2], timeout=60, what="the two good runs")
    assert len(trace_infos(app.server, app.experiment)) == 2
    assert spooled(spool_of(app)) == []


BIG_APP = """
    import time


    @agent.tool_plain
    def fetch_page(url: str) -> str:
        \"\"\"A large page.\"\"\"
        return "x" * 15_000

    for i in range({runs}):
        agent.run_sync(f"big {{i}} ")
        time.sleep(0.35)
"""
BIG_RUNS = 12
BIG_RUN_SPANS = 5
"""agent, 2 model requests, 2 tools."""


def test_spool_bound_drops_oldest_first_and_says_how_many(app: App, proxy: FaultProxy) -> None:
    app.write("import os\nos.umask(0)\n" + tool_agent("big", BIG_APP.format(runs=BIG_RUNS)))
    spool = spool_of(app)
    proxy.mode = "refuse"
    env = proxied_env(app, proxy, TRACED_RUN_SPOOL_MAX_MB="1", TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT))
    done = app.run("python", "app.py", env=env)
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stderr.decode().splitlines()
    print(f"spool bound: {lines}")
    # The app runs for less than OUTAGE_NOTICE: one line, at exit.
    (line,) = lines
    said = re.fullmatch(rf"traced-run: (\d+) spans of \d+ traces? not delivered to .* kept in "
                        rf"{re.escape(str(spool))};.*; (\d+) spans dropped \(spool over spool_max_mb=1\)",
                        line)
    assert said, line

    batches = spooled(spool)
    total = sum(p.stat().st_size for p in spool.rglob("*") if p.is_file())
    assert 0 < total <= 1024 * 1024, total
    kept: set[int] = set()  # a run's spans may be split over two batches
    kept_spans = 0
    for batch in batches:
        header, _, payload = batch.read_bytes().partition(b"\n")
        kept_spans += int(re.search(rb'"spans": (\d+)', header).group(1))  # type: ignore[union-attr]
        kept |= {int(n) for n in re.findall(rb"big (\d+) ", payload)}
    kept_runs = sorted(kept)
    assert kept_runs and kept_runs[0] > 0 and kept_runs == list(range(kept_runs[0], BIG_RUNS)), \
        f"the newest runs stay, the oldest go first: kept {kept_runs}"
    assert int(said.group(1)) == kept_spans, "the line counts spans the bound removed as kept"
    assert int(said.group(2)) == BIG_RUNS * BIG_RUN_SPANS - kept_spans


HUGE_APP = """
    @agent.tool_plain
    def fetch_page(url: str) -> str:
        \"\"\"A very large page.\"\"\"
        return "x" * 40_000

    for i in range(4):
        agent.run_sync(f"huge {i} ")
"""


def test_batch_larger_than_the_spool_bound_is_kept_in_parts(app: App, proxy: FaultProxy) -> None:
    """Four runs that each carry a 40 kB page about ten times (tool result,
    model input, the agent's messages) make more than 1 MB in one batch: kept
    in parts, the newest kept and the oldest past the bound dropped and counted."""
    app.write(tool_agent("huge", HUGE_APP))
    spool = spool_of(app)
    proxy.mode = "refuse"
    # Encoding a megabyte batch again in parts takes longer than the default exit bound here.
    done = app.run("python", "app.py", env=proxied_env(app, proxy, TRACED_RUN_SPOOL_MAX_MB="1"))
    assert done.returncode == 0, done.stderr.decode()
    (line,) = done.stderr.decode().splitlines()
    print(f"oversized batch: {line}; spool files: {[p.stat().st_size for p in spooled(spool)]}")
    said = re.fullmatch(r"traced-run: (\d+) spans of \d+ traces? not delivered to .* kept in .*; "
                        r"(\d+) spans dropped \(spool over spool_max_mb=1\)", line)
    assert said, line
    kept_spans = 0
    kept_runs: set[int] = set()
    for batch in spooled(spool):
        header, _, payload = batch.read_bytes().partition(b"\n")
        kept_spans += json.loads(header)["spans"]
        kept_runs |= {int(n) for n in re.findall(rb"huge (\d+) ", payload)}
    assert sum(p.stat().st_size for p in spooled(spool)) <= 1024 * 1024
    assert 3 in kept_runs and 0 not in kept_runs, f"the newest spans stay, the oldest go: kept {kept_runs}"
    assert int(said.group(1)) == kept_spans
    assert int(said.group(2)) == 4 * BIG_RUN_SPANS - kept_spans

    proxy.mode = "forward"
    flush(app, proxied_env(app, proxy))
    experiment_id = app.server.experiment_id(app.experiment)
    assert experiment_id is not None
    poll(lambda: [t for t in app.server.traces(experiment_id) if "huge 3 " in (t.info.request_preview or "")],
         timeout=60, what="the newest run's trace")

    # Parts are cut by size, not at trace boundaries (where depends on how the delivery
    # thread's batches fell): what arrives is every kept span, nothing more.
    def arrived() -> int:
        return sum(len(trace.data.spans) for trace in app.server.traces(experiment_id))

    poll(lambda: arrived() >= kept_spans, timeout=60, what=f"the {kept_spans} kept spans")
    assert arrived() == kept_spans


def test_spool_is_the_owners_only(app: App, proxy: FaultProxy) -> None:
    app.write("import os\nos.umask(0)\n" + tool_agent("private", "agent.run_sync('private 0')\n"))
    spool = spool_of(app)  # made by traced-run, under umask 0 (one that exists is never chmod-ed: test_spool)
    proxy.mode = "refuse"
    done = app.run("python", "app.py", env=proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT)))
    assert done.returncode == 0, done.stderr.decode()
    files = [p for p in spool.rglob("*") if p.is_file()]
    assert files
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}


# --- every process traced -----------------------------------------------------------------
POOL_TASKS = 6
POOL_APP = """
    import multiprocessing
    import os
    import sys


    def task(i: int) -> int:
        agent.run_sync(f"task {{i}}")
        return os.getpid()


    if __name__ == "__main__":
        pool = multiprocessing.get_context(sys.argv[1]).Pool(2)
        pids = pool.map(task, range({tasks}), chunksize=1)
        pool.close()
        pool.join()
        print(len(set(pids)))
"""


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_pool_one_trace_per_task(app: App, method: str) -> None:
    app.write(tool_agent("pooled", POOL_APP.format(tasks=POOL_TASKS)))
    env = app.env(TRACED_RUN_SPOOL_DIR=str(spool_of(app)), TRACED_RUN_EXIT_TIMEOUT=GENEROUS_EXIT)
    done = app.run("python", "app.py", method, env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    print(f"{method}: tasks ran in {done.stdout.decode().strip()} worker processes")
    wait_runs(app.server, app.experiment, "task", POOL_TASKS)


def test_python_subprocess_and_os_fork_child_ending_with_os_exit_deliver(app: App) -> None:
    app.write(tool_agent("child", "agent.run_sync('proc 2')\n"), "child.py")
    app.write(tool_agent("parent", """
    import os
    import subprocess
    import sys

    agent.run_sync("proc 0")
    child = os.fork()
    if child == 0:
        agent.run_sync("proc 1")
        os._exit(0)  # no atexit: the fork hook's os._exit wrapper must flush
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    sys.exit(subprocess.run([sys.executable, "child.py"]).returncode)
    """))
    env = app.env(TRACED_RUN_SPOOL_DIR=str(spool_of(app)), TRACED_RUN_EXIT_TIMEOUT=GENEROUS_EXIT)
    done = app.run("python", "app.py", env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""
    infos = wait_runs(app.server, app.experiment, "proc", 3)
    assert sorted(i.tags["service.name"] for i in infos) == ["app", "app", "child"]


WSGI_APP = tool_agent("wsgi", """
    import os
    import time


    def application(environ, start_response):
        n = environ["PATH_INFO"].strip("/")
        agent.run_sync(f"request {n}")
        time.sleep(0.3)  # keeps this worker busy so the other one takes the next request
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
""")

ASGI_APP = tool_agent("asgi", """
    import os
    import time


    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        n = scope["path"].strip("/")
        await agent.run(f"request {n}")
        time.sleep(0.3)  # blocks this worker on purpose, so the other one takes the next request
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
""")
REQUESTS = 8


def serve_and_count(app: App, command: list[str], port: int, booted: Callable[[str], bool]) -> set[str]:
    """Start a prefork server under traced-run, wait for its workers, send
    REQUESTS requests two at a time, stop it with SIGTERM; the worker pids that answered."""
    env = app.env(TRACED_RUN_SPOOL_DIR=str(spool_of(app)), TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT))
    with serving(app, command, port, env, booted) as log, ThreadPoolExecutor(2) as pool:
        pids = set(pool.map(lambda n: request(f"http://127.0.0.1:{port}/{n}"), range(REQUESTS)))
    output = log.read_text()
    assert "traced-run:" not in output, output
    return pids


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_gunicorn_workers_one_trace_per_request(app: App, which: Callable[[str], str], preload: bool) -> None:
    app.write(WSGI_APP)
    port = free_port()
    command = [which("gunicorn"), "-w", "2", "-b", f"127.0.0.1:{port}", *(["--preload"] if preload else []),
               "app:application"]
    pids = serve_and_count(app, command, port, lambda log: log.count("Booting worker with pid") >= 2)
    assert len(pids) == 2, pids
    wait_runs(app.server, app.experiment, "request", REQUESTS)


def test_uvicorn_workers_one_trace_per_request(app: App, which: Callable[[str], str]) -> None:
    app.write(ASGI_APP)
    port = free_port()
    command = [which("uvicorn"), "--workers", "2", "--host", "127.0.0.1", "--port", str(port), "app:app"]
    pids = serve_and_count(app, command, port, lambda log: log.count("Application startup complete") >= 2)
    assert len(pids) == 2, pids
    wait_runs(app.server, app.experiment, "request", REQUESTS)


# --- signals and crashes ------------------------------------------------------------------
def signal_mid_run(app: App, proxy: FaultProxy, mlflow: str, signum: int,
                   *args: str) -> tuple[subprocess.Popen[bytes], Lines, bytes, float]:
    """Run app.py (a loop of agent runs) under traced-run with MLflow up or
    hanging, send ``signum`` after a few runs; the process, its stdout, its
    stderr and how long it took to end after the signal."""
    experiment_id = app.server.client().create_experiment(app.experiment)
    env = proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT),
                      MLFLOW_EXPERIMENT_ID=str(experiment_id))
    del env["MLFLOW_EXPERIMENT_NAME"]
    if mlflow == "hanging":
        proxy.mode = "hang"
        env["OTEL_EXPORTER_OTLP_TIMEOUT"] = POST_TIMEOUT  # an exit that waited for the post would take it
    process = start(app, "python", "app.py", *args, env=env)
    try:
        out = Lines(process)
        out.wait_for("done 5")
        signalled = time.monotonic()
        process.send_signal(signum)
        process.wait(timeout=60)
        elapsed = time.monotonic() - signalled
        err = out.finish(timeout=60)
    finally:
        stop(process)
    return process, out, err, elapsed


def every_finished_run_arrives(app: App, proxy: FaultProxy, mlflow: str, said: list[str], prefix: str,
                               runs: int) -> None:
    """Delivered, or (MLflow hanging) spooled, said so in one line, and sent by
    a flush: every run the app finished is there once. The run the signal
    interrupted may have finished too (before its "done" line), or left spans
    of an unfinished trace."""
    if mlflow == "hanging":
        kept = "not delivered" in said[0] or "no answer within" in said[0]  # unsent, or sent unanswered
        assert len(said) == 1 and kept and str(spool_of(app)) in said[0], said
        assert spooled(spool_of(app))
        proxy.mode = "forward"
        flush(app, proxied_env(app, proxy))
        assert spooled(spool_of(app)) == []
    else:
        assert said == []

    def ready() -> list[Any] | None:
        infos = trace_infos(app.server, app.experiment)
        complete = run_numbers([i for i in infos if finished(i)], prefix)
        return infos if set(range(runs)) <= set(complete) else None

    infos = poll(ready, timeout=60, what=f"{runs} finished runs", interval=0.5)
    complete = run_numbers([i for i in infos if finished(i)], prefix)
    assert complete in (list(range(runs)), list(range(runs + 1))), complete
    assert len(infos) - len(complete) <= 1, [(i.request_preview, i.state) for i in infos]


@pytest.mark.parametrize("mlflow", ["up", "hanging"])
def test_sigterm_mid_run_delivers_or_spools_every_finished_run(app: App, proxy: FaultProxy,
                                                              mlflow: str) -> None:
    app.write(loop_app("term", pause=0.1))
    process, out, err, elapsed = signal_mid_run(app, proxy, mlflow, signal.SIGTERM)
    runs = out.done()
    print(f"SIGTERM, MLflow {mlflow}: ended {elapsed:.2f}s after the signal, {runs} runs finished; "
          f"stderr: {err.decode().strip()}")
    assert process.returncode == -signal.SIGTERM, err.decode()
    assert elapsed < NOT_WAITING, elapsed
    lines = err.decode().splitlines()
    assert lines == traced_lines(err), lines
    every_finished_run_arrives(app, proxy, mlflow, lines, "term", runs)


INTERRUPTED_APP = """
    import signal
    import sys
    import time

    how = sys.argv[1]
    stopped = []
    if how == "handler":
        signal.signal(signal.SIGINT, lambda signum, frame: stopped.append(signum))


    def loop() -> None:
        i = 0
        while not stopped and i < 400:
            agent.run_sync(f"int {i}")
            print(f"done {i}", flush=True)
            i += 1
            time.sleep(0.1)


    if how == "except":
        try:
            loop()
        except KeyboardInterrupt:
            print("the app caught KeyboardInterrupt", flush=True)
    else:
        loop()
        print(f"the app's handler ran: {stopped}", flush=True)
"""


@pytest.mark.parametrize(("how", "mlflow"),
                         [("except", "up"), ("handler", "hanging"), ("uncaught", "hanging")])
def test_sigint_mid_run_delivers_or_spools_every_finished_run(app: App, proxy: FaultProxy, how: str,
                                                             mlflow: str) -> None:
    """Ctrl-C: KeyboardInterrupt, caught by the app or not, or the app's own
    SIGINT handler; traced-run delivers through atexit within the exit bound."""
    app.write(tool_agent("interrupted", INTERRUPTED_APP))
    process, out, err, elapsed = signal_mid_run(app, proxy, mlflow, signal.SIGINT, how)
    runs = out.done()
    print(f"SIGINT ({how}), MLflow {mlflow}: ended {elapsed:.2f}s after the signal, {runs} runs finished; "
          f"stdout ends {out.lines[-1:]}; stderr: {err.decode().strip()[-300:]}")
    assert elapsed < NOT_WAITING, elapsed
    if how == "uncaught":
        assert process.returncode == -signal.SIGINT, err.decode()
        # Python prints the traceback before atexit runs, so our line comes after it.
        assert [line for line in err.decode().splitlines() if line not in traced_lines(err)][-1] == \
            "KeyboardInterrupt", err.decode()
    else:
        assert process.returncode == 0, err.decode()
        ran = {"except": "the app caught KeyboardInterrupt",
               "handler": f"the app's handler ran: [{signal.SIGINT:d}]"}
        assert out.lines[-1] == ran[how], out.lines[-3:]
        assert err.decode().splitlines() == traced_lines(err), err.decode()
    every_finished_run_arrives(app, proxy, mlflow, traced_lines(err), "int", runs)


def test_uncaught_exception_in_a_tool_after_good_runs(app: App, proxy: FaultProxy) -> None:
    app.write(tool_agent("crashy", """
    @agent.tool_plain
    def explode(what: str) -> str:
        \"\"\"Fails on the third run.\"\"\"
        if "crash 2" in RUNNING:
            raise RuntimeError("tool blew up")
        return "fine"

    for i in range(3):
        RUNNING = f"crash {i}"
        agent.run_sync(RUNNING)
    """))
    done = app.run("python", "app.py", env=proxied_env(app, proxy))
    assert done.returncode == 1
    assert done.stderr.decode().endswith("RuntimeError: tool blew up\n"), done.stderr.decode()
    assert not traced_lines(done.stderr)
    infos = wait_runs(app.server, app.experiment, "crash", 3)
    states = {run_numbers([i], "crash")[0]: str(i.state).rsplit(".", 1)[-1] for i in infos}
    assert states == {0: "OK", 1: "OK", 2: "ERROR"}
