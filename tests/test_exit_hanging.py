"""Leaving a hanging MLflow (issue 15, item 3), against the real MLflow behind
the fault proxy: a process that has seen MLflow hang earlier in its life
exits at once (what MLflow has not answered goes to the spool, nothing is
lost: a flush sends it all once MLflow answers again), and a process whose
MLflow answers again gives it the last batch directly."""

from __future__ import annotations

import re
import time

import pytest
from conftest import App, poll
from support.faultproxy import FaultProxy
from support.launched import (
    EXIT_TIMEOUT,
    Lines,
    flush,
    loop_app,
    proxied_env,
    spool_of,
    spooled,
    start,
    stop,
    tool_agent,
    traced_lines,
    wait_runs,
)

HUNG_EXIT_BOUND = 20.0
"""The exit bound of the processes that meet a hanging MLflow here: long, so that leaving
at once and waiting it out stay far apart on a loaded machine (a 2 s bound was not)."""
AT_ONCE = HUNG_EXIT_BOUND / 2
"""Most seconds from the app's last line to its end when the exit does not wait for
MLflow: half the bound a hanging MLflow would cost, five times a loaded machine's
interpreter shutdown (1.9 s seen at load 7)."""


@pytest.mark.parametrize(("learnt", "timeout", "posts", "reason"), [
    ("a post timed out", "2", 2, r"no answer within 2\.0 s"),
    ("a post waits longer than the exit bound", "60", 1, r"no answer from MLflow within [\d.]+ s"),
], ids=["post-timed-out", "post-waiting"])
def test_a_process_that_saw_mlflow_hang_exits_at_once_and_loses_nothing(
        app: App, proxy: FaultProxy, learnt: str, timeout: str, posts: int, reason: str) -> None:
    """MLflow hangs for the whole life of a process that makes a run every
    ~0.05 s. The process leaves once a post has gone unanswered for its whole
    timeout (2 s: the second post has begun), or once its first post, with a
    60 s timeout, has waited longer than the exit bound."""
    app.write(loop_app("hung", pause=0.05))
    spool = spool_of(app)
    env = proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT=str(HUNG_EXIT_BOUND),
                      OTEL_EXPORTER_OTLP_TIMEOUT=timeout)
    proxy.mode = "hang"
    process = start(app, "python", "app.py", env=env)
    try:
        out = Lines(process)
        poll(lambda: proxy.count(path="/", mode="hang") >= posts, timeout=60, what=f"{posts} posts")
        if learnt == "a post waits longer than the exit bound":
            time.sleep(HUNG_EXIT_BOUND + 0.5)  # the hang itself: MLflow leaves the post unanswered meanwhile
        (app.directory / "stop").touch()
        out.wait_for("stopped")
        err, exit_took = out.finish_timed(timeout=60)
    finally:
        stop(process)
    runs = out.done()
    print(f"{learnt}: exit took {exit_took:.2f}s after the app's last line; {runs} runs; "
          f"{proxy.count(path='/')} requests; stderr: {err.decode().strip()}")
    assert process.returncode == 0, err.decode()
    assert exit_took < AT_ONCE, f"the exit waited {exit_took:.2f}s for a hanging MLflow"
    lines = err.decode().splitlines()
    assert lines == traced_lines(err) and len(lines) == 1, lines
    assert re.fullmatch(rf"traced-run: \d+ spans of \d+ traces not delivered to {re.escape(proxy.url)}"
                        rf"/v1/traces \({reason}\): kept in {re.escape(str(spool))}; .*", lines[0]), lines[0]
    assert spooled(spool)

    proxy.mode = "forward"
    flush(app, proxied_env(app, proxy))
    wait_runs(app.server, app.experiment, "hung", runs)
    assert spooled(spool) == []


def test_an_mlflow_that_hung_and_answers_again_gets_the_last_batch_directly(
        app: App, proxy: FaultProxy) -> None:
    """MLflow hangs (a post times out), then answers again; the app makes its last
    run right before it exits: that batch reaches MLflow from the exit, not the spool."""
    app.write(tool_agent("healed", """
    import os
    import time

    i = 0
    while not os.path.exists("stop") and i < 400:
        agent.run_sync(f"healed {i}")
        print(f"done {i}", flush=True)
        i += 1
        time.sleep(0.1)
    agent.run_sync(f"healed {i}")  # the last run: its spans are queued when the process leaves
    print(f"done {i}", flush=True)
    """))
    env = proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT=str(EXIT_TIMEOUT), OTEL_EXPORTER_OTLP_TIMEOUT="1")
    proxy.mode = "hang"
    process = start(app, "python", "app.py", env=env)
    try:
        out = Lines(process)
        # A second post means the first one ended, unanswered after its 1 s timeout.
        poll(lambda: proxy.count(path="/", mode="hang") >= 2, timeout=60, what="a post that timed out")
        proxy.mode = "forward"
        poll(lambda: 200 in proxy.statuses(), timeout=60, what="a batch delivered again")
        (app.directory / "stop").touch()
        err = out.finish(timeout=60)
    finally:
        stop(process)
    runs = out.done()
    print(f"healed: {runs} runs; {proxy.count()} posts; stderr: {err.decode().strip()}")
    assert process.returncode == 0, err.decode()
    assert spooled(spool_of(app)) == [], "a healthy MLflow's last batch was spooled"
    wait_runs(app.server, app.experiment, "healed", runs)
    for line in err.decode().splitlines():  # only what was spooled while MLflow hung, and sent later
        assert re.fullmatch(r"traced-run: \d+ spans were spooled while .* and sent later", line), line
