"""traced-run benchmark: one entry point, prints a Markdown report on stdout.

    python benchmarks/run.py            # the full run (by hand; ~16-19 min on 2 cores)
    python benchmarks/run.py --quick    # smoke run: 1 repetition, small N
    python benchmarks/run.py --publish  # the full run, also written to docs/benchmarks/

Uses the venv of the interpreter running it (installs ``.[test]`` there if a
compared tool is missing), starts its own MLflow server on a free loopback
port with its store in a temporary directory, runs every variant interleaved
(A B C A B C ...) after warm-up rounds, and prints medians, min-max, the ratio or
difference against the baseline and, where the project sets one, the target
with PASS or MISS, after the run's conditions (taken by the script: date,
commit, command, machine, load, versions, wall time). Progress goes to stderr.
Exit code 1 if a section failed. The report is written to a file only when asked:
``--out PATH``, or ``--publish`` (docs/benchmarks/, which the Performance page shows).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from artifact import RunInfo, publish
from harness import (
    BIN,
    Mlflow,
    Row,
    clean_env,
    ensure_tools,
    log,
    make_workdir,
    placement_line,
    remove_workdir,
    table,
)
from sections import Bench, Plan, burst, exit_delay, first_import, peak_rss, per_run, startup

SECTIONS = {
    "1": "startup of `python -c pass`",
    "2": "first `import pydantic_ai`",
    "3": "per-run overhead",
    "4": "exit delay with MLflow down",
    "5": "peak RSS",
    "6": "burst delivery",
}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repetition, small N (~1-2 min)")
    parser.add_argument("--only", default="123456", help="sections to run, e.g. 14 (default: all)")
    parser.add_argument("--reps", type=int, help="kept repetitions of every section (warm-ups unchanged)")
    parser.add_argument("--per-run-runs", type=int, help="timed agent runs per process in section 3 "
                        "(default 1000; quick 50)")
    parser.add_argument("--burst-runs", type=int, help="agent runs per burst (default 2000; quick 50)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (MLflow store, logs)")
    # Off by default: a run by hand (a change being tried, a busy machine) never lands in the
    # docs; publishing is a decision, and each published run is a new dated file, never overwritten.
    parser.add_argument("--publish", action="store_true",
                        help="also write the report to docs/benchmarks/<date>-<HHMM>-<commit>-s<sections>.md "
                        "and rewrite docs/benchmarks/latest.md (docs/performance.md shows it)")
    parser.add_argument("--out", type=Path, metavar="PATH", help="also write the report to PATH")
    args = parser.parse_args()
    if args.publish and args.quick:
        parser.error("--publish takes a measurement, not a --quick smoke run")
    return args


def main() -> int:
    args = _arguments()
    ensure_tools()
    info = RunInfo.start()  # after the install, if one was needed: the versions are the measured ones
    plan = Plan.quick() if args.quick else Plan()
    if args.burst_runs:
        plan.burst_runs = args.burst_runs
    if args.per_run_runs:
        plan.per_run_runs = args.per_run_runs
    if args.reps:
        plan.startup_reps = plan.import_reps = plan.per_run_reps = args.reps
        plan.exit_reps = plan.rss_reps = plan.burst_reps = args.reps
    wanted = [s for s in SECTIONS if s in args.only]
    workdir = make_workdir()
    mlflow = Mlflow(workdir)
    boot_dir = subprocess.run([str(BIN / "traced-run"), "--print-pythonpath"], capture_output=True, text=True,
                              check=True, timeout=60, env=clean_env()).stdout.strip()
    bench = Bench(plan, workdir, mlflow, boot_dir)
    rows: list[Row] = []
    failed: list[str] = []

    def section(number: str, measure: Callable[[], list[Row]]) -> None:
        if number not in wanted:
            return
        log(f"section {number}: {SECTIONS[number]}")
        try:
            rows.extend(measure())
        except Exception as error:
            failed.append(f"section {number} ({SECTIONS[number]}) failed: {type(error).__name__}: {error}")
            log(traceback.format_exc())

    needs_server = any(s in wanted for s in "2356")
    try:
        if needs_server:
            log(f"starting MLflow at {mlflow.url} (and warming it up with one traced run)")
            mlflow.start_in_background(timeout=300)
        if needs_server and not args.quick:
            mlflow.wait_ready(timeout=600)  # the full run measures on a quiet, warm server
        # 1 and 4 never reach the server: in --quick they overlap its start-up
        section("1", lambda: startup(bench))
        section("4", lambda: exit_delay(bench))
        if needs_server:
            mlflow.wait_ready(timeout=600)
            experiment = mlflow.create_experiment("bench-runs")
            section("2", lambda: first_import(bench, experiment))
            section("3", lambda: per_run(bench, experiment))
            section("5", lambda: peak_rss(bench, experiment))
            section("6", lambda: burst(bench))
    except Exception as error:
        failed.append(f"harness failed: {type(error).__name__}: {error}")
        log(traceback.format_exc())
    finally:
        mlflow.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            remove_workdir(workdir)

    rows.sort(key=lambda row: row.section)  # stable: keeps each section's own order
    info.end()
    measured = "".join(sorted({row.section for row in rows}))
    report = _report(args, plan, info, measured, rows, failed, bench.notes)
    print(report)
    written = _write(args, report, info, measured)
    return 1 if failed or not written else 0


def _write(args: argparse.Namespace, report: str, info: RunInfo, measured: str) -> bool:
    """The report's files, if asked for; False (and one line on stderr) if one could not be written."""
    text = report.rstrip("\n") + "\n"
    try:
        if args.out:
            args.out.write_text(text, encoding="utf-8")
            log(f"report written to {args.out}")
        if args.publish and measured:
            log(f"published {publish(text, info, measured)} and rewrote docs/benchmarks/latest.md")
        elif args.publish:
            log("nothing published: no section has figures")
    except (OSError, ValueError) as error:
        log(f"could not write the report: {error}")
        return False
    return True


def _report(args: argparse.Namespace, plan: Plan, info: RunInfo, measured: str, rows: list[Row],
            failed: list[str], notes: list[str]) -> str:
    lines = [
        info.heading(measured) + (" (--quick smoke run: few repetitions, small N)" if args.quick else ""),
        "",
        *info.metadata(),
        f"- repetitions (warm-up + kept, interleaved): startup {plan.startup_warmups}+{plan.startup_reps}, "
        f"import {plan.import_warmups}+{plan.import_reps}, "
        f"per-run {plan.per_run_warmups}+{plan.per_run_reps} of {plan.per_run_runs} runs, "
        f"exit {plan.exit_warmups}+{plan.exit_reps}, RSS {plan.rss_warmups}+{plan.rss_reps} of "
        f"{plan.rss_runs} runs, burst {plan.burst_reps} of {plan.burst_runs} runs",
        "- MLflow: `mlflow server --backend-store-uri sqlite:///… --host 127.0.0.1 --workers 1` with "
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, "
        "warmed up by one traced run; traced-run and the manual setup use MLFLOW_EXPERIMENT_ID / "
        "the x-mlflow-experiment-id header (no lookup by name)",
        placement_line(),
        "- opentelemetry-instrument: OTEL_TRACES_EXPORTER=otlp, "
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf, metrics and logs exporters none; "
        "the app calls Agent.instrument_all()",
    ]
    if args.quick:
        lines.append("- --quick: smoke figures only: section 4's variants ran at the same time, and "
                     "sections 1 and 4 ran while the MLflow server was starting")
    lines += ["", table(rows), ""]
    if failed:
        lines += ["#### Failures", "", *[f"- {f}" for f in failed], ""]
    if notes:
        lines += ["#### stderr of traced-run (last line per process, deduplicated)", "",
                  *[f"- {n}" for n in sorted(set(notes))], ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
