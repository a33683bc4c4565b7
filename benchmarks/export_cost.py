"""Where traced-run's per-run CPU goes, in process, stage by stage.

``python benchmarks/export_cost.py [--runs 200] [--reps 7]``

Records the spans of ``--runs`` runs of the benchmark app's agent (TestModel,
one tool) with an in-memory processor, then times, per agent run, each stage
the delivery thread puts those spans through: ``enrich.for_mlflow``
(OpenInference's rewrite of a copy, the conversation, redaction), the SDK's
protobuf encoding, serialising, gzip. Prints the least CPU time of ``--reps``
repetitions of each (µs per agent run), and the request's size. No MLflow, no
network, no thread: the figures are the stages' own CPU, for comparing a
change before and after it.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from pydantic_ai import Agent
from pydantic_ai.models.instrumented import InstrumentationSettings
from pydantic_ai.models.test import TestModel

from traced_run.config.settings import Settings
from traced_run.delivery.export import encode, request_bytes
from traced_run.spans import enrich
from traced_run.transport import COMPRESS_LEVEL


class _Kept(SpanProcessor):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


def record(runs: int) -> list[ReadableSpan]:
    """The spans of ``runs`` runs of benchmarks/app.py's agent."""
    kept = _Kept()
    provider = TracerProvider()
    provider.add_span_processor(kept)
    Agent.instrument_all(InstrumentationSettings(tracer_provider=provider))
    agent = Agent(TestModel(), name="bench", instructions="Be brief.")

    @agent.tool_plain
    def lookup(city: str) -> str:
        """Look a city up."""
        return f"{city}: sunny"

    for _ in range(runs):
        agent.run_sync("What is the weather in Paris?")
    Agent.instrument_all(False)
    return kept.spans


def timed(what: Callable[[], object], reps: int) -> float:
    """The least CPU seconds (this process's) of ``reps`` calls of ``what``, after one
    untimed call: on a shared machine the least is the figure other work disturbed least."""
    what()
    times = []
    for _ in range(reps):
        started = time.process_time()
        what()
        times.append(time.process_time() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    settings = Settings()
    spans = record(args.runs)
    enriched = [enrich.for_mlflow(span, settings) for span in spans]
    request = encode_spans(enriched)
    payload = encode(spans, settings)

    stages: Sequence[tuple[str, Callable[[], Any]]] = (
        ("enrich.for_mlflow", lambda: [enrich.for_mlflow(span, settings) for span in spans]),
        ("encode_spans (SDK, to protobuf objects)", lambda: encode_spans(enriched)),
        ("SerializeToString", request.SerializeToString),
        ("export.request_bytes (what traced-run sends)", lambda: request_bytes(enriched)),
        ("gzip level 6", lambda: gzip.compress(payload, compresslevel=6)),
        (f"gzip level {COMPRESS_LEVEL} (what traced-run sends)",
         lambda: gzip.compress(payload, compresslevel=COMPRESS_LEVEL)),
        ("export.encode (enrich + request_bytes)", lambda: encode(spans, settings)),
    )
    per_span = len(spans) / args.runs
    attributes = statistics.mean(len(span.attributes or {}) for span in enriched)
    print(f"{args.runs} agent runs, {per_span:g} spans per run, {attributes:.1f} attributes per span "
          f"as MLflow gets it; least CPU of {args.reps}, µs per agent run")
    for name, what in stages:
        print(f"  {name:45s} {timed(what, args.reps) / args.runs * 1e6:8.0f}")
    sizes = ", ".join(f"{len(gzip.compress(payload, compresslevel=level)) / args.runs:.0f} gzip level {level}"
                      for level in (COMPRESS_LEVEL, 6))
    print(f"  request bytes per run: {len(payload) / args.runs:.0f} raw, {sizes}")


if __name__ == "__main__":
    main()
