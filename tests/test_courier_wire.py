"""What the courier rebuilds from the tuples the app sends it is the span the app had:
MLflow gets the same request bytes whether the app or its courier made them."""

from __future__ import annotations

import marshal
from collections.abc import Iterator
from typing import Any

import conversations
import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceState
from pydantic_ai import Agent
from pydantic_ai.models.instrumented import InstrumentationSettings

from traced_run.config.settings import Settings
from traced_run.delivery.courier import flatten
from traced_run.delivery.courier_process import _Rebuilder
from traced_run.delivery.export import Outcome, Rejected, encode, outcome_of, plain


@pytest.fixture
def recorded() -> Iterator[Any]:
    """The spans of one kind of conversation, as the delivery thread takes them."""

    def run(kind: str) -> list[ReadableSpan]:
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        Agent.instrument_all(InstrumentationSettings(tracer_provider=provider))
        conversations.KINDS[kind]()
        return list(exporter.get_finished_spans())

    yield run
    Agent.instrument_all(False)


def sent(spans: list[ReadableSpan], rebuilder: _Rebuilder | None = None) -> list[ReadableSpan]:
    """``spans`` as the courier has them after the trip through marshal."""
    resources, scopes, flat = marshal.loads(marshal.dumps(flatten(spans)))
    return (rebuilder or _Rebuilder()).spans(resources, scopes, flat)


SETTINGS = [Settings(), Settings(include_content=False), Settings(redact=("Paris|sunny",))]


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "no-content", "redacted"])
@pytest.mark.parametrize("kind", list(conversations.KINDS))
def test_the_courier_sends_what_the_app_would_have_sent(recorded: Any, kind: str, settings: Settings) -> None:
    spans = recorded(kind)
    assert encode(sent(spans), settings) == encode(spans, settings)


def test_every_field_survives_the_trip() -> None:
    """What pydantic-ai's spans do not show: events, links, remote parents, trace state,
    every attribute type OpenTelemetry allows, several resources and scopes."""
    remote = SpanContext(0xA1, 0xB2, is_remote=True, trace_state=TraceState([("k", "v"), ("x", "y")]))
    local = SpanContext(0xC3 << 100, 0xD4 << 50, is_remote=False)
    values: dict[str, Any] = {
        "text": "héllo ✓", "empty": "", "yes": True, "zero": 0, "big": 2**62, "pi": 3.25, "texts": ("a", ""),
        "numbers": (1, -2), "flags": (True, False), "floats": (0.5,),
    }
    scopes = [InstrumentationScope("pydantic-ai", "2.0", "https://schema/1", {"s": 1}),
              InstrumentationScope("app"), None]
    resources = [Resource({"service.name": "bot"}, "https://schema/r"), Resource({"service.name": "other"})]
    spans = [
        ReadableSpan(name=f"span {n}", context=SpanContext(0xE5 + n, 0xF6 + n, is_remote=False,
                                                           trace_state=TraceState([("t", str(n))])),
                     parent=(remote, local, None)[n % 3], resource=resources[n % 2],
                     instrumentation_scope=scopes[n % 3], attributes=values if n < 3 else {},
                     events=[Event("said", {"n": n, "what": "x"}, 10 + n), Event("", None, 0)][: n % 3],
                     links=[Link(local, {"why": "because"}), Link(remote)][: n % 3],
                     kind=list(SpanKind)[n % 5], start_time=1700000000000000000 + n,
                     end_time=1700000000000000100 + n,
                     status=[Status(StatusCode.ERROR, "bad ✗"), Status(StatusCode.OK), Status()][n % 3])
        for n in range(7)
    ]
    settings = Settings()
    assert encode(sent(spans), settings) == encode(spans, settings)


def test_a_resource_is_one_object_across_batches() -> None:
    """Redaction keeps a redacted copy per resource object: one per batch would grow without end."""
    resource = Resource({"service.name": "bot"})
    span = ReadableSpan(name="a", context=SpanContext(1, 2, is_remote=False), resource=resource)
    rebuilder = _Rebuilder()
    first, second = sent([span], rebuilder), sent([span], rebuilder)
    assert first[0].resource is second[0].resource


def test_an_outcome_survives_the_trip() -> None:
    inner = Outcome(False, True, "rejected: bad", 400)
    outcome = Outcome(True, False, "some rejected", 400, (Rejected(b"\x01\x02", 3, inner),))
    assert outcome_of(marshal.loads(marshal.dumps(plain(outcome)))) == outcome
