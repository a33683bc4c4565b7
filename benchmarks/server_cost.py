"""What MLflow's server spends storing an agent run, per exporter.

``python benchmarks/server_cost.py [--runs 500] [--reps 3]``

Starts an MLflow server as ``run.py`` does (harness.Mlflow), then, ``--reps``
times, runs the benchmark app under traced-run and with the manual setup (the
order swapped every repetition), each into an experiment of its own, waits
until every trace is stored, and prints the CPU time the server's process tree
took meanwhile per agent run (from ``/proc``), next to the app's own wall and
CPU per run. The apps and the server run where section 3 puts them (harness.APP_CPUS,
SERVER_CPUS). The server's share of section 3's unplaced MLflow rows came from this work.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import APP, APP_CPUS, BIN, PYTHON, Mlflow, clean_env, make_workdir, remove_workdir, run

_TICKS = os.sysconf("SC_CLK_TCK")


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (utime + stime, from /proc)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / _TICKS
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=500, help="timed agent runs per app process")
    parser.add_argument("--reps", type=int, default=3, help="processes per exporter")
    args = parser.parse_args()
    root = make_workdir()
    mlflow = Mlflow(root)
    try:
        mlflow.start()
        mlflow.wait_healthy(120)
        mlflow.warm_up()
        assert mlflow.process is not None
        print(f"{args.runs} agent runs per process; µs per agent run", flush=True)
        print(f"{'exporter':12} {'rep':>3} {'server CPU':>11} {'app wall':>9} {'app CPU':>8} traces",
              flush=True)
        for rep in range(args.reps):
            for exporter in ("traced-run", "manual")[::1 if rep % 2 == 0 else -1]:
                experiment = mlflow.create_experiment(exporter)
                if exporter == "manual":
                    argv = [PYTHON, str(APP), "--setup", "manual", "--runs", str(args.runs)]
                    env = clean_env(BENCH_OTLP_ENDPOINT=f"{mlflow.url}/v1/traces",
                                    BENCH_EXPERIMENT_ID=experiment)
                else:
                    argv = [str(BIN / "traced-run"), PYTHON, str(APP), "--runs", str(args.runs)]
                    env = clean_env(MLFLOW_TRACKING_URI=mlflow.url, MLFLOW_EXPERIMENT_ID=experiment)
                before = _tree_cpu(mlflow.process.pid)
                result = run(argv, env, cwd=root, timeout=600, cpus=APP_CPUS).result()
                # One trace per timed run and one for the app's first (untimed) run.
                arrived = mlflow.wait_count(experiment, args.runs + 1, since=time.monotonic(), deadline_s=120,
                                            settle_s=3)
                server_us = (_tree_cpu(mlflow.process.pid) - before) / args.runs * 1e6
                print(f"{exporter:12} {rep + 1:>3} {server_us:>11.0f} {result['per_run_us']:>9.0f} "
                      f"{result['cpu_per_run_us']:>8.0f} {arrived.count}", flush=True)
    finally:
        mlflow.stop()
        remove_workdir(root)


if __name__ == "__main__":
    main()
