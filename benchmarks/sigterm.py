"""SIGTERM at a random moment into a busy traced app: does every process end, by SIGTERM,
and how long after the signal (issue 23: a handler that took a lock hung 1 try in 30).

``python benchmarks/sigterm.py [--tries 100] [--bound 6]``

Each try starts ``traced-run python busy.py`` (a TestModel agent with one tool, runs in a loop) against
a loopback OTLP endpoint that answers at once (``harness.InstantOtlp``), waits for its first
run, then sends SIGTERM after a random 0.05-0.6 s. A process still alive ``--bound`` seconds
later counts as hung (and is killed). Prints how many ended, their exit codes and the time
from signal to exit. Not part of ``run.py``'s report: tests/test_exit_signals.py is the
suite's check; this is the figure quoted in docs/failure-behaviour.md.
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BIN, PYTHON, InstantOtlp, clean_env, make_workdir, remove_workdir

BUSY_APP = """
from pydantic_ai import Agent
from pydantic_ai.models.test import TestModel

agent = Agent(TestModel(), name="busy")


@agent.tool_plain
def lookup(city: str) -> str:
    \"\"\"Look a city up.\"\"\"
    return f"{city}: sunny"


agent.run_sync("first")
print("ready", flush=True)
while True:
    agent.run_sync("again")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=100)
    parser.add_argument("--bound", type=float, default=6.0, help="seconds after SIGTERM that count as hung")
    args = parser.parse_args()
    workdir = make_workdir()
    endpoint = InstantOtlp()
    codes: collections.Counter[int | str] = collections.Counter()
    waits: list[float] = []
    try:
        (workdir / "busy.py").write_text(BUSY_APP)
        env = clean_env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{endpoint.url}/v1/traces",
                        TRACED_RUN_SPOOL_DIR=str(workdir / "spool"))
        for _ in range(args.tries):
            process = subprocess.Popen([str(BIN / "traced-run"), PYTHON, "busy.py"],
                                       env=env, cwd=workdir, stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            assert process.stdout is not None
            process.stdout.readline()  # "ready": its pipeline is up
            time.sleep(random.uniform(0.05, 0.6))
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                codes[process.wait(args.bound)] += 1
                waits.append(time.monotonic() - signalled)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                codes["hung"] += 1
            process.stdout.close()
    finally:
        endpoint.close()
        remove_workdir(workdir)
    print("| tries | ended by SIGTERM | other exits | hung | signal to exit, median | max |")
    print("|---|---|---|---|---|---|")
    others = {code: n for code, n in codes.items() if code not in (-signal.SIGTERM, "hung")}
    print(f"| {args.tries} | {codes[-signal.SIGTERM]} | {others or 'none'} | {codes['hung']} | "
          f"{statistics.median(waits) if waits else 0:.2f} s | {max(waits, default=0):.2f} s |")


if __name__ == "__main__":
    main()
