"""What one hostile prompt costs a traced app: wall time of the whole process, untraced and
under traced-run, for the prompt ``"://" + "a-" * N`` (issue 23), which made the default
URL-password rule quadratic while Python's ``re`` held the GIL.

``python benchmarks/hostile_prompt.py [--pairs 20000] [--reps 5]``

The benchmark app (``app.py --prompt-file``: TestModel agent with one tool, two runs with that
prompt) runs interleaved untraced and under ``traced-run`` against a loopback OTLP endpoint that
answers 200 at once (``harness.InstantOtlp``: no MLflow shares the cores), default
``exit_timeout``. Prints the median and min-max wall time of each, the difference, and whether
traced-run printed an exit line (it does when spans were not delivered within the exit bound).
Not part of ``run.py``'s report: it is how redaction's bound is checked before and after a
change to it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    APP,
    BIN,
    PYTHON,
    Done,
    InstantOtlp,
    clean_env,
    interleave,
    make_workdir,
    remove_workdir,
    run,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20_000, help='"a-" pairs in the prompt (20000: 40 KB)')
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=600, help="seconds a process may take")
    args = parser.parse_args()
    workdir = make_workdir()
    endpoint = InstantOtlp()
    try:
        (workdir / "prompt.txt").write_text("://" + "a-" * args.pairs)
        env = {"untraced": clean_env(),
               "traced-run": clean_env(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=f"{endpoint.url}/v1/traces")}
        app = [PYTHON, str(APP), "--prompt-file", "prompt.txt"]
        argv = {"untraced": app, "traced-run": [str(BIN / "traced-run"), *app]}

        def once(variant: str) -> Done:
            done = run(argv[variant], env[variant], cwd=workdir, timeout=args.timeout)
            if done.returncode != 0:
                raise RuntimeError(f"{variant} exited {done.returncode}: {done.stderr[-2000:]}")
            return done

        kept = interleave(list(argv), 1, args.reps, once, f"{args.pairs * 2 + 3} character prompt")
    finally:
        endpoint.close()
        remove_workdir(workdir)
    medians = {variant: statistics.median(done.wall_s for done in runs) for variant, runs in kept.items()}
    print("| prompt | variant | wall median (s) | min-max (s) | vs untraced | exit line |")
    print("|---|---|---|---|---|---|")
    for variant, runs in kept.items():
        walls = [done.wall_s for done in runs]
        lines = sum("traced-run:" in done.stderr for done in runs)
        print(f"| {args.pairs * 2 + 3} chars | {variant} | {medians[variant]:.2f} | "
              f"{min(walls):.2f}-{max(walls):.2f} | {medians[variant] - medians['untraced']:+.2f} s | "
              f"{lines} of {len(runs)} |")


if __name__ == "__main__":
    main()
