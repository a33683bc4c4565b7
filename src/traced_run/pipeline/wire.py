"""Trace context on the wire: the requests an agent run makes carry it out, a server takes it in.

Out: the app's global propagator (``OTEL_PROPAGATORS``; W3C trace context and baggage unless the
app set others) is wrapped, so that whatever injects with it inside an agent run (the MCP SDK into
``_meta``, an app's HTTPXClientInstrumentor or RequestsInstrumentor) sends the trace as MLflow gets
it, with traced-run's ``tracestate`` entry (see spans.context). httpx and httpx2 clients inject
nothing of their own: at ``send`` a request without a ``traceparent`` gets one through that
propagator. No client span is made: the tool's span the request is sent from is the parent, and
a span per request would add nothing MLflow shows. Left as they are: every request outside agent
runs, and those of a model call (they go to the model's provider, which traces nothing into this
MLflow; it learns no more than it must).

In: a Starlette (FastAPI) or Flask app called with a sampled ``traceparent`` runs the request in
that context, unless something around it has set one (an app's own server instrumentation takes
the same headers itself). Which trace the spans then land in is spans.context's decision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context, attach, detach
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.trace import NonRecordingSpan

from traced_run import patches
from traced_run.spans.context import Rerooted
from traced_run.spans.selection import TraceSelection

WhenImported = Callable[[str, Callable[[ModuleType], None]], None]
_MODEL_CALL = "chat"
"""pydantic-ai's ``gen_ai.operation.name`` of a model request span."""


class Wire:
    """What a request made now carries, for this process's selection and destination."""

    def __init__(self, selection: TraceSelection, rerooted: Rerooted) -> None:
        self._selection = selection
        self._rerooted = rerooted

    def outgoing(self, context: Context | None = None) -> Context | None:
        """The context to inject instead of ``context`` (default: the current one) when its span
        is part of an agent run's agent or tool operation; None: leave the request as it is."""
        span_context = trace.get_current_span(context).get_span_context()
        if not span_context.is_valid:
            return None
        agent = self._selection.agent_span_over(span_context)
        if agent is None or (agent.attributes or {}).get("gen_ai.operation.name") == _MODEL_CALL:
            return None
        return trace.set_span_in_context(NonRecordingSpan(self._rerooted.outgoing(span_context)), context)

    def inject_into(self, headers: Any) -> None:
        """Put the trace into a client's request ``headers``, if it goes out and none is there."""
        if "traceparent" in headers:
            return
        context = self.outgoing()
        if context is not None:
            propagate.get_global_textmap().inject(headers, context)

    def install(self, when_imported: WhenImported, *, outgoing: bool) -> None:
        if outgoing:
            patches.replace(propagate, "set_global_textmap", self._wrapping)
            propagate.set_global_textmap(propagate.get_global_textmap())
            for name in ("httpx", "httpx2"):
                when_imported(name, self._patch_client)
        when_imported("starlette.applications", _patch_starlette)
        when_imported("flask.app", _patch_flask)

    def _wrapping(self, original: Callable[[TextMapPropagator], None]) -> Callable[[TextMapPropagator], None]:
        def set_global_textmap(http_text_format: TextMapPropagator) -> None:
            if not isinstance(http_text_format, _Outgoing):
                http_text_format = _Outgoing(http_text_format, self)
            original(http_text_format)

        return set_global_textmap

    def _patch_client(self, module: ModuleType) -> None:
        wire = self

        def sync_send(send: Callable[..., Any]) -> Callable[..., Any]:
            def sending(client: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
                wire.inject_into(request.headers)
                return send(client, request, *args, **kwargs)

            return sending

        def async_send(send: Callable[..., Any]) -> Callable[..., Any]:
            async def sending(client: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
                wire.inject_into(request.headers)
                return await send(client, request, *args, **kwargs)

            return sending

        patches.replace(module.Client, "send", sync_send)
        patches.replace(module.AsyncClient, "send", async_send)


class _Outgoing(TextMapPropagator):
    """The app's propagator, injecting the context ``Wire.outgoing`` gives inside agent runs."""

    def __init__(self, inner: TextMapPropagator, wire: Wire) -> None:
        self._inner = inner
        self._wire = wire

    def inject(self, carrier: CarrierT, context: Context | None = None,
               setter: Setter[CarrierT] = default_setter) -> None:
        self._inner.inject(carrier, self._wire.outgoing(context) or context, setter)

    def extract(self, carrier: CarrierT, context: Context | None = None,
                getter: Getter[CarrierT] = default_getter) -> Context:
        return self._inner.extract(carrier, context, getter)

    @property
    def fields(self) -> set[str]:
        return self._inner.fields


def _incoming(headers: Callable[[], Mapping[str, str]]) -> Context | None:
    """The context a request with a ``traceparent`` runs in (``headers``: all of its headers,
    lower-case names); None when one is set already or the caller's is not sampled (the
    callee then traces on its own)."""
    if trace.get_current_span().get_span_context().is_valid:
        return None
    context = propagate.extract(headers())
    remote = trace.get_current_span(context).get_span_context()
    return context if remote.is_valid and remote.trace_flags.sampled else None


def _asgi_headers(scope: Mapping[str, Any]) -> Callable[[], Mapping[str, str]] | None:
    raw: Iterable[tuple[bytes, bytes]] = scope.get("headers") or ()
    if not any(name == b"traceparent" for name, _ in raw):
        return None
    return lambda: {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}


def _patch_starlette(module: ModuleType) -> None:
    def make(call: Callable[..., Any]) -> Callable[..., Any]:
        async def __call__(app: Any, scope: Any, receive: Any, send: Any) -> None:
            headers = _asgi_headers(scope) if scope.get("type") in ("http", "websocket") else None
            context = _incoming(headers) if headers is not None else None
            if context is None:
                await call(app, scope, receive, send)
                return
            token = attach(context)
            try:
                await call(app, scope, receive, send)
            finally:
                detach(token)

        return __call__

    patches.replace(module.Starlette, "__call__", make)


def _patch_flask(module: ModuleType) -> None:
    def make(wsgi_app: Callable[..., Any]) -> Callable[..., Any]:
        def traced_wsgi_app(app: Any, environ: dict[str, Any], start_response: Any) -> Any:
            if "HTTP_TRACEPARENT" not in environ:
                return wsgi_app(app, environ, start_response)
            context = _incoming(lambda: {key[5:].lower().replace("_", "-"): value
                                         for key, value in environ.items() if key.startswith("HTTP_")})
            if context is None:
                return wsgi_app(app, environ, start_response)
            token = attach(context)
            try:
                return wsgi_app(app, environ, start_response)
            finally:
                detach(token)

        return traced_wsgi_app

    patches.replace(module.Flask, "wsgi_app", make)
