"""The pydantic-ai app every benchmark process runs (one agent with a tool, TestModel).

``python app.py --setup none|floor|manual|instrument-all [--warm W] [--runs N] [--prompt-file F]``

- ``none``: the app has no tracing code (run bare, or under traced-run).
- ``floor``: pydantic-ai's own instrumentation on an OpenTelemetry SDK
  TracerProvider with no span processor: what any tracing of pydantic-ai
  costs before a span is exported (``Agent.instrument_all()``).
- ``manual``: the usual setup done in code, as MLflow's and OpenInference's docs
  show it: TracerProvider + OpenInferenceSpanProcessor + BatchSpanProcessor(
  OTLPSpanExporter) with default settings, then ``Agent.instrument_all()``.
  Endpoint and experiment id come from BENCH_OTLP_ENDPOINT / BENCH_EXPERIMENT_ID.
- ``instrument-all``: only ``Agent.instrument_all()`` (the provider comes from
  ``opentelemetry-instrument``).

Timings (seconds from ``time.perf_counter`` / ``time.monotonic``, which is
system-wide on Linux; CPU from ``time.process_time``, all threads of the
process) are printed as JSON lines on stdout: a ``loop_end`` line as soon as
the timed runs are done, and a final result line as the last thing the
script does, so the harness can tell the app's own work from its exit.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any


def _emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def _manual_setup() -> None:
    from openinference.instrumentation.pydantic_ai import OpenInferenceSpanProcessor
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = OTLPSpanExporter(
        endpoint=os.environ["BENCH_OTLP_ENDPOINT"],
        headers={"x-mlflow-experiment-id": os.environ.get("BENCH_EXPERIMENT_ID", "0")},
    )
    provider = TracerProvider()
    provider.add_span_processor(OpenInferenceSpanProcessor())
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def _floor_setup() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setup", choices=("none", "floor", "manual", "instrument-all"), default="none")
    parser.add_argument("--warm", type=int, default=0, help="untimed agent runs before the timed ones")
    parser.add_argument("--warm-seconds", type=float, default=0.0,
                        help="keep making untimed runs until this long after the first one (so work a "
                             "tracer defers to its first batch is done before the timing starts)")
    parser.add_argument("--runs", type=int, default=1, help="timed agent runs")
    parser.add_argument("--prompt-file", help="the prompt of every run (default: a question on the weather)")
    args = parser.parse_args()
    prompt = "What is the weather in Paris?"
    if args.prompt_file:
        with open(args.prompt_file) as given:
            prompt = given.read()

    started = time.perf_counter()
    if args.setup == "manual":
        _manual_setup()
    elif args.setup == "floor":
        _floor_setup()
    import pydantic_ai

    if args.setup in ("floor", "manual", "instrument-all"):
        pydantic_ai.Agent.instrument_all()
    imported = time.perf_counter()

    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    agent = Agent(TestModel(), name="bench", instructions="Be brief.")

    @agent.tool_plain
    def lookup(city: str) -> str:
        """Look a city up."""
        return f"{city}: sunny"

    agent.run_sync(prompt)
    first_run = time.perf_counter()
    warm_runs = 0
    while warm_runs < args.warm or time.perf_counter() - first_run < args.warm_seconds:
        agent.run_sync(prompt)
        warm_runs += 1
    loop_start = time.monotonic()
    timed_start = time.perf_counter()
    cpu_start = time.process_time()
    thread_start = time.thread_time()
    for _ in range(args.runs):
        agent.run_sync(prompt)
    timed = time.perf_counter() - timed_start
    cpu = time.process_time() - cpu_start
    thread_cpu = time.thread_time() - thread_start
    loop_end = time.monotonic()
    _emit({"loop_end": loop_end})
    _emit({
        "import_s": imported - started,
        "first_run_s": first_run - imported,
        "per_run_us": timed / max(args.runs, 1) * 1e6,
        "cpu_per_run_us": cpu / max(args.runs, 1) * 1e6,
        "app_thread_cpu_per_run_us": thread_cpu / max(args.runs, 1) * 1e6,
        "runs": 1 + warm_runs + args.runs,
        "loop_start": loop_start,
        "loop_end": loop_end,
        "end": time.monotonic(),
    })


if __name__ == "__main__":
    main()
