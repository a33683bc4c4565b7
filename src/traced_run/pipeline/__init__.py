"""Builds the span pipeline once per process and switches on pydantic-ai's
instrumentation for every agent.

Agents the app does not instrument use traced-run's settings and a private
tracer provider. Agents the app (or logfire, or MLflow's autolog) does
instrument keep their settings and their destination: the ``Router`` joins
traced-run's processor to the provider their spans go to. Either way the spans
pass ``selection`` (whole agent traces only) on their way to ``delivery``. The
global provider is never replaced, so the app's own ``set_tracer_provider``
keeps working.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace import Span as SdkSpan
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.util.types import Attributes

from traced_run import flags, patches, report
from traced_run.config import compat
from traced_run.config.settings import Settings
from traced_run.config.sources import load
from traced_run.delivery import Delivery, DeliveryProcessor
from traced_run.pipeline import mlflow_native
from traced_run.pipeline.app_export import AppExports, UnlessLeftToApp
from traced_run.pipeline.wire import WhenImported, Wire
from traced_run.spans.context import Rerooted
from traced_run.spans.durable import WorkflowIds
from traced_run.spans.selection import PYDANTIC_AI_SCOPE, TraceSelection
from traced_run.transport import NO_TRACKING_URI

_installed = False
_install_lock = threading.Lock()


def install(when_imported: WhenImported) -> None:
    """Set up tracing for this process; fail-open unless strict mode says otherwise.
    ``when_imported(name, then)`` calls ``then(module)`` once the module ``name`` is imported."""
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
        loaded.say_notes()
        settings = loaded.settings
        if not settings.enabled:
            return
        try:
            compat.check()
            if settings.mode == "mlflow":
                mlflow_native.install(settings)
            else:
                ratio = sample_ratio(settings, loaded.sources["sample_ratio"], os.environ)
                _instrument(settings, ratio, when_imported)
        except (mlflow_native.MlflowMissing, compat.Unsupported) as error:
            _fail(str(error), strict_code=report.EXIT_SETUP, strict=settings.strict)
        except report.ConfigError as error:  # a setting only this step reads (no tracking URI)
            _fail(str(error), strict_code=report.EXIT_CONFIG, strict=settings.strict)
        except Exception as error:
            _fail(f"could not set up tracing: {type(error).__name__}: {error}",
                  strict_code=report.EXIT_SETUP, strict=settings.strict)


def _fail(message: str, *, strict_code: int, strict: bool) -> None:
    if strict:
        report.say(f"{message} (strict mode: stopping the app)")
        raise SystemExit(strict_code)
    report.say(f"{message}; the app runs untraced")


def _instrument(settings: Settings, ratio: float, when_imported: WhenImported) -> None:
    import pydantic_ai
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
    attributes = dict(settings.resource_attributes)
    # OTEL_RESOURCE_ATTRIBUTES' service.name names one too; OTEL_SERVICE_NAME beats it, as in the SDK.
    service = settings.service_name or attributes.get("service.name") or _service_name()
    attributes["service.name"] = service
    attributes.setdefault("host.name", socket.gethostname())
    private = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False,
                             id_generator=WorkflowIds())
    rerooted = Rerooted(processor, destination(settings))
    selection = TraceSelection(rerooted, service_name=service, own=private.resource)
    delivery.interrupt = selection.interrupt
    delivery.open_root = selection.open_root
    router = Router(selection, private, (PYDANTIC_AI_SCOPE, pydantic_ai.__version__),
                    left_to_app=AppExports(settings).left_to_app)
    router.watch(InstrumentationSettings)
    Agent.instrument_all(InstrumentationSettings(tracer_provider=private, **options))
    delivery.install_exit_hooks()
    delivery.start()
    Wire(selection, rerooted).install(when_imported, outgoing=settings.propagate_context)


def destination(settings: Settings) -> str:
    """Where this process's traces go, as far as a callee needs to tell it is the same:
    two processes with the same settings for it write to the same MLflow experiment."""
    experiment = (f"id:{settings.experiment_id}" if settings.experiment_id
                  else f"name:{settings.experiment_name}" if settings.experiment_name else "id:0")
    return f"{settings.traces_endpoint}\n{settings.workspace or ''}\n{experiment}"


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


class Router:
    """Makes every pydantic-ai span reach traced-run, whoever set up pydantic-ai's instrumentation.

    The app may instrument pydantic-ai itself (``logfire.instrument_pydantic_ai()``,
    its own ``Agent.instrument_all(...)``, ``agent.instrument = ...``,
    ``InstrumentedModel``, MLflow's autolog): each of those builds an
    ``InstrumentationSettings``, whose tracer decides where the spans go. Every
    such object is watched: its spans keep going where the app sends them, and
    the provider they go to gets traced-run's processor as well (joined once).
    Settings without a provider follow pydantic-ai's rule (the global provider)
    while the app has set one, and go to traced-run's private provider while
    it has not (pydantic-ai would record nothing then). The global provider the
    app sets is joined too, so the spans around an agent run (the HTTP request
    span) are seen from their start. Agents nobody instrumented use traced-run's
    own settings and its private provider, so the app's destinations get exactly
    what they got without traced-run. The spans of a provider the app exports from
    to the same MLflow, into another experiment, are left to it (see app_export).
    """

    def __init__(self, processor: SpanProcessor, private: TracerProvider, scope: tuple[str, str],
                 left_to_app: Callable[[object], bool] = lambda provider: False) -> None:
        self._processor = processor
        self.private = private
        self.scope = scope
        self._left_to_app = left_to_app
        self._lock = threading.Lock()
        self._joined: dict[int, object] = {}
        """What carries our processor, by id (the object is kept, so no id is reused)."""
        self._told: set[str] = set()
        self._global: tuple[object, trace.TracerProvider] | None = None
        self.join(private)

    def watch(self, settings_class: type) -> None:
        """Route the tracer of every ``InstrumentationSettings`` made from now on; and
        join each global provider the app sets from now on, and the one it has set."""
        router = self

        def route(original_init: Any) -> Any:
            # wraps() (in patches.replace) keeps the signature: logfire reads it to choose its arguments.
            def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
                original_init(self, *args, **kwargs)
                self.tracer = router.tracer_for(kwargs.get("tracer_provider"), self.tracer)

            return __init__

        def join_each(original_set: Any) -> Any:
            def set_tracer_provider(tracer_provider: trace.TracerProvider) -> None:
                original_set(tracer_provider)
                router.global_provider()

            return set_tracer_provider

        patches.replace(settings_class, "__init__", route)
        patches.replace(trace, "set_tracer_provider", join_each)
        self.global_provider()

    def tracer_for(self, provider: trace.TracerProvider | None, tracer: trace.Tracer) -> trace.Tracer:
        if provider is None or isinstance(provider, trace.ProxyTracerProvider):
            return _RoutedTracer(self, None, None)
        if not hasattr(provider, "add_span_processor"):
            return _RoutedTracer(self, provider, tracer)
        self.join(provider)
        return _RoutedTracer(self, provider, tracer)

    def join(self, provider: Any) -> bool:
        """Add our processor to ``provider`` unless it carries it; False if it cannot take one.
        logfire's provider wraps an SDK provider that a second ``logfire.configure()``
        replaces: the wrapped one is what carries processors."""
        if not hasattr(provider, "add_span_processor"):
            return False
        carrier = getattr(provider, "provider", provider)
        if id(carrier) in self._joined:
            return True
        with self._lock:
            if id(carrier) not in self._joined:
                provider.add_span_processor(self._processor if carrier is self.private
                                            else UnlessLeftToApp(self._processor, carrier, self._left_to_app))
                self._joined[id(carrier)] = carrier
        return True

    def global_provider(self) -> trace.TracerProvider:
        """Where settings without a provider send spans now: the app's global provider
        (joined) once it has set one, else ours."""
        current = trace.get_tracer_provider()
        known = self._global
        if known is not None and known[0] is current:
            return known[1]
        target = current if self.join(current) else self.private
        self._global = (current, target)
        return target

    def cannot_join(self, provider: object) -> None:
        kind = f"{type(provider).__module__}.{type(provider).__qualname__}"
        if kind in self._told:
            return
        self._told.add(kind)
        report.say(f"the app gives pydantic-ai the tracer provider {kind}, which traced-run cannot add "
                   f"its processor to: those agent runs are not sent to MLflow (give pydantic-ai an "
                   f"OpenTelemetry SDK TracerProvider, or none)")


class _RoutedTracer(trace.Tracer):
    """A pydantic-ai tracer whose spans go where the app sends them, with traced-run joined there."""

    def __init__(self, router: Router, provider: trace.TracerProvider | None,
                 tracer: trace.Tracer | None) -> None:
        self._router = router
        self._provider = provider
        self._tracer = tracer
        self._by_provider: dict[int, tuple[trace.TracerProvider, trace.Tracer]] = {}

    def _real(self) -> trace.Tracer:
        provider, tracer = self._provider, self._tracer
        if provider is None:
            return self._tracer_of(self._router.global_provider())
        if not self._router.join(provider):
            self._router.cannot_join(provider)
        assert tracer is not None
        return tracer

    def _tracer_of(self, provider: trace.TracerProvider) -> trace.Tracer:
        known = self._by_provider.get(id(provider))
        if known is None or known[0] is not provider:
            known = self._by_provider[id(provider)] = (provider, provider.get_tracer(*self._router.scope))
        return known[1]

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

    def __getattr__(self, name: str) -> Any:
        """What else the tracer it stands for has (an SDK tracer's ``resource``,
        ``instrumentation_scope``, ``sampler``): code that reads it finds it."""
        if name in _ROUTED_OWN:  # not set yet (unpickling, a half-built copy): no recursion
            raise AttributeError(name)
        return getattr(self._real(), name)


_ROUTED_OWN = frozenset({"_router", "_provider", "_tracer", "_by_provider"})
