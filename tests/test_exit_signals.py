"""SIGTERM can arrive at any moment, traced-run's own locked code included: the
process still ends, by SIGTERM, within its bound. And what traced-run changes
in the interpreter (``signal.signal``, ``signal.getsignal``, ``os._exit``)
still answers as the app expects."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from conftest import AGENT, App, traced_env
from support.faultproxy import FaultProxy
from support.launched import Lines, proxied_env, start

CHILD_BOUND = 20.0
"""How long a signalled child may take to end before it counts as hung: generous for a
loaded machine (its exit bound is 2 s); a deadlock never ends at all."""

FORKING_APP = AGENT + """
    import json
    import os
    import random
    import signal
    import sys
    import time

    import traced_run

    ROOT = os.path.dirname(traced_run.__file__)
    how, first, last, step = sys.argv[1], *map(int, sys.argv[2:5])
    agent.run_sync("warm up")  # the pipeline and its threads are up before the forks


    def signal_at_line(k):
        \"\"\"A trace function that sends SIGTERM at the k-th line traced-run runs on
        this thread: the handler then runs inside that code, locks held.\"\"\"
        seen = 0

        def local(frame, event, arg):
            nonlocal seen
            if event == "line":
                seen += 1
                if seen == k:
                    signalled.append(k)
                    os.kill(os.getpid(), signal.SIGTERM)
            return local

        return lambda frame, event, arg: local if frame.f_code.co_filename.startswith(ROOT) else None


    signalled = []
    ends = {}
    for k in range(first, last, step):
        pid = os.fork()
        if pid == 0:
            if how == "line":
                sys.settrace(signal_at_line(k))
            for i in range(400):
                agent.run_sync(f"child {k} run {i}")
                if signalled:  # the app stops making runs; the exit thread ends it once delivered
                    sys.settrace(None)
                    while True:
                        time.sleep(1)
            os._exit(0)
        if how == "random":
            time.sleep(random.uniform(0.0, 0.3))
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + float(os.environ["CHILD_BOUND"])
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                ends[k] = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                ends[k] = "hung"
                break
            time.sleep(0.01)
    print(json.dumps(ends))
"""


def child_ends(app: App, how: str, first: int, last: int, step: int) -> dict[str, object]:
    app.write(FORKING_APP)
    env = traced_env(app, exit_timeout="2", CHILD_BOUND=str(CHILD_BOUND))
    done = app.run("python", "app.py", how, str(first), str(last), str(step), env=env, timeout=900)
    assert done.returncode == 0, done.stderr.decode()
    ends: dict[str, object] = json.loads(done.stdout)
    return ends


def test_sigterm_inside_traced_runs_own_code_ends_the_process_at_every_line(app: App) -> None:
    """A run passes about 300 lines of traced-run's code on the app's thread (span start
    and end, the trace selection's lock held for most of them); a SIGTERM between any two
    of them (every fourth is tried) ends the child by SIGTERM. A handler that took a lock
    hung here."""
    ends = child_ends(app, "line", 1, 320, 4)
    assert {k: end for k, end in ends.items() if end != -signal.SIGTERM} == {}


def test_sigterm_at_random_moments_into_a_busy_app_ends_it(app: App) -> None:
    ends = child_ends(app, "random", 0, 30, 1)
    assert {k: end for k, end in ends.items() if end != -signal.SIGTERM} == {}


SLEEPY_APP = AGENT + """
    agent.run_sync("first")
    print("ran", flush=True)
    import time
    time.sleep(600)
"""


def test_a_second_sigterm_while_delivering_ends_the_process_at_once(app: App, proxy: FaultProxy) -> None:
    """MLflow hangs, so the first SIGTERM's delivery waits out the exit bound; a second
    SIGTERM ends the process now, as it would without traced-run."""
    app.write(SLEEPY_APP)
    proxy.mode = "hang"
    process = start(app, "python", "app.py", env=proxied_env(app, proxy, TRACED_RUN_EXIT_TIMEOUT="120"))
    out = Lines(process)
    out.wait_for("ran")
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # not waiting for a trace: giving the first signal's delivery time to begin
    assert process.poll() is None, "the first SIGTERM did not wait for its delivery"
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("a second SIGTERM did not end the process") from None
    assert process.returncode == -signal.SIGTERM


WHAT_THE_APP_SEES = AGENT + """
    import json
    import os
    import signal

    agent.run_sync("first")
    seen = {"at start": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}

    def own(signum, frame):
        pass

    seen["set returns the default"] = signal.signal(signal.SIGTERM, own) == signal.SIG_DFL
    seen["own handler"] = signal.getsignal(signal.SIGTERM) is own
    seen["set back returns own"] = signal.signal(signal.SIGTERM, signal.SIG_DFL) is own
    seen["default again"] = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    seen["names kept"] = [signal.signal.__name__, signal.getsignal.__name__]
    print(json.dumps(seen), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
"""


def test_signal_functions_answer_what_the_app_set_and_sigterm_still_delivers(app: App) -> None:
    app.write(WHAT_THE_APP_SEES)
    done = app.run("python", "app.py", env=traced_env(app))
    assert json.loads(done.stdout) == {
        "at start": True, "set returns the default": True, "own handler": True,
        "set back returns own": True, "default again": True, "names kept": ["signal", "getsignal"],
    }, done.stderr.decode()
    assert done.returncode == -signal.SIGTERM, done.stderr.decode()
    assert done.stderr.decode().strip() == ""
    app.traces(1)
