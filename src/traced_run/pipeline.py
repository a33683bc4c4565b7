"""Builds the span pipeline once per process and switches on pydantic-ai's
instrumentation for every agent.

Which TracerProvider receives the spans is decided at the first span, not at
import: an app that configures logfire or its own SDK provider after importing
pydantic_ai (the usual order) gets our processor added to its provider; an app
that configures nothing gets a private provider. The global provider is never
replaced, so the app's own ``set_tracer_provider`` keeps working.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.util.types import Attributes

from traced_run import flags, mlflow_native, report
from traced_run.delivery import Delivery, DeliveryProcessor
from traced_run.settings import Settings
from traced_run.sources import load
from traced_run.transport import NO_TRACKING_URI

_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Set up tracing for this process; fail-open unless strict mode says otherwise."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
        try:
            loaded = load()
        except report.ConfigError as error:
            _fail(f"{error}", strict_code=report.EXIT_CONFIG, strict=flags.strict(os.environ))
            return
        settings = loaded.settings
        if not settings.enabled:
            return
        try:
            if settings.mode == "mlflow":
                mlflow_native.install(settings)
            else:
                _instrument(settings, sample_ratio(settings, loaded.sources["sample_ratio"], os.environ))
        except mlflow_native.MlflowMissing as error:
            _fail(str(error), strict_code=report.EXIT_SETUP, strict=settings.strict)
        except Exception as error:
            _fail(f"could not set up tracing: {type(error).__name__}: {error}",
                  strict_code=report.EXIT_SETUP, strict=settings.strict)


def _fail(message: str, *, strict_code: int, strict: bool) -> None:
    if strict:
        report.say(f"{message} (strict mode: stopping the app)")
        raise SystemExit(strict_code)
    report.say(f"{message}; the app runs untraced")


def _instrument(settings: Settings, ratio: float) -> None:
    from pydantic_ai import Agent
    from pydantic_ai.models.instrumented import InstrumentationSettings

    if not settings.traces_endpoint:
        raise report.ConfigError(NO_TRACKING_URI)
    delivery = Delivery(settings)
    options: dict[str, Any] = {
        "include_content": settings.include_content,
        "include_binary_content": settings.include_binary_content,
    }
    if settings.instrumentation_version is not None:
        options["version"] = settings.instrumentation_version
    processor: SpanProcessor = DeliveryProcessor(delivery)
    if ratio < 1:
        processor = _SampledProcessor(processor, ratio)
    provider = _DeferredProvider(settings, processor)
    Agent.instrument_all(InstrumentationSettings(tracer_provider=provider, **options))
    delivery.install_exit_hooks()
    delivery.start()


_RATIO_SAMPLERS = {"traceidratio": None, "parentbased_traceidratio": None, "always_on": 1.0,
                   "parentbased_always_on": 1.0, "always_off": 0.0, "parentbased_always_off": 0.0}


def sample_ratio(settings: Settings, source: str, environ: Mapping[str, str]) -> float:
    """sample_ratio when set; else what OTEL_TRACES_SAMPLER(_ARG) say, for the
    samplers that are a ratio (others are the app's own provider's business)."""
    if source != "default":
        return settings.sample_ratio
    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler not in _RATIO_SAMPLERS:
        return settings.sample_ratio
    fixed = _RATIO_SAMPLERS[sampler]
    if fixed is not None:
        return fixed
    try:
        ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1"))
    except ValueError:
        return 1.0  # the OTel SDK's own fallback for a bad argument
    return min(max(ratio, 0.0), 1.0)


class _SampledProcessor(SpanProcessor):
    """Passes on the spans of the traces kept by the SDK's TraceIdRatioBased
    rule: decided by the trace id alone, so every span of a trace, in any
    process, gets the same answer and no trace is cut in half."""

    def __init__(self, inner: SpanProcessor, ratio: float) -> None:
        self._inner = inner
        self._bound = TraceIdRatioBased.get_bound_for_rate(ratio)

    def on_start(self, span: SdkSpan, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is not None and context.trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < self._bound:
            self._inner.on_end(span)

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _service_name() -> str:
    """The script or module the process runs, for ``service.name``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        name: str = spec.name
        return name.removesuffix(".__main__")
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-") else ""
    base = os.path.basename(argv0)
    return os.path.splitext(base)[0] or "python"


class _DeferredProvider(trace.TracerProvider):
    """Hands out tracers whose real provider is chosen at the first span."""

    def __init__(self, settings: Settings, processor: SpanProcessor) -> None:
        self._settings = settings
        self._processor = processor
        self._target: trace.TracerProvider | None = None
        self._lock = threading.Lock()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes | None = None,
    ) -> trace.Tracer:
        return _DeferredTracer(self, (instrumenting_module_name, instrumenting_library_version, schema_url))

    def resolve(self) -> trace.TracerProvider:
        with self._lock:
            if self._target is None:
                self._target = self._choose()
            return self._target

    def _choose(self) -> trace.TracerProvider:
        current: Any = trace.get_tracer_provider()
        if hasattr(current, "add_span_processor"):
            current.add_span_processor(self._processor)
            return current  # type: ignore[no-any-return]
        attributes = dict(self._settings.resource_attributes)
        attributes["service.name"] = self._settings.service_name or _service_name()
        attributes.setdefault("host.name", socket.gethostname())
        provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
        provider.add_span_processor(self._processor)
        return provider


class _DeferredTracer(trace.Tracer):
    def __init__(self, provider: _DeferredProvider, key: tuple[str, str | None, str | None]) -> None:
        self._provider = provider
        self._key = key
        self._tracer: trace.Tracer | None = None

    def _real(self) -> trace.Tracer:
        if self._tracer is None:
            self._tracer = self._provider.resolve().get_tracer(*self._key)
        return self._tracer

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        return self._real().start_span(
            name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception
        )

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._real().start_as_current_span(*args, **kwargs)
