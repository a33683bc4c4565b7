"""The courier process's side (``python -S -m traced_run.delivery.courier_process <app pid>``):
rebuilds the spans the app's delivery thread sends, makes MLflow's copy of them, encodes
and posts it, and answers with the request body and what MLflow said. It keeps nothing:
a batch is the app's until answered (see ``courier``)."""

from __future__ import annotations

import contextlib
import marshal
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from traced_run.config.settings import Settings
from traced_run.delivery.courier import read_message, write_message
from traced_run.delivery.export import Sender, encode, plain
from traced_run.delivery.spool import Target
from traced_run.transport import import_network_modules


def main(app: int) -> None:
    """Serve the app over the socket on stdin until it closes it."""
    _bound_to(app)
    channel = socket.socket(fileno=0)
    settings_fields = _request(channel)
    if settings_fields is None:
        return
    import_network_modules()
    settings = Settings(**settings_fields)
    sender = Sender(settings)
    rebuild = _Rebuilder()
    _answer(channel, "ready")
    while (answer := _handled(_request(channel), settings, sender, rebuild)) is not None:
        _answer(channel, answer)


def _handled(request: Any, settings: Settings, sender: Sender, rebuild: _Rebuilder) -> Any:
    """The answer to ``request`` (None at the end of the input); what the request held is
    freed before the answer is written."""
    if request is None:
        return None
    timeout, target, resources, scopes, spans = request
    try:
        payload = encode(rebuild.spans(resources, scopes, spans), settings)
        outcome = None if timeout is None else sender.post_by_trace(payload, Target(*target), timeout)
        # A delivered batch's body is of no more use to the app: only one it keeps or sets aside is.
        body = b"" if outcome is not None and outcome.delivered else payload
        return body, None if outcome is None else plain(outcome)
    except Exception as error:  # the app sends this batch itself, and says why
        return "error", f"{type(error).__name__}: {error}"


def _request(channel: socket.socket) -> Any:
    return read_message(channel.recv_into)


def _answer(channel: socket.socket, message: Any) -> None:
    write_message(channel.sendall, marshal.dumps(message))


def _bound_to(app: int) -> None:
    """Ignore the terminal's signals (the app decides); yield the CPU to the app when they
    compete for it (a batch waits for this process, the app's user for the app); on Linux,
    die with the app's delivery thread, which started this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # a sandbox that forbids it: the courier still works
        os.nice(10)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
            libc.prctl(15, b"traced-courier")  # PR_SET_NAME: what ps -e and top show
        except (OSError, AttributeError):
            pass
    if os.getppid() != app:  # the app died before the line above took effect
        raise SystemExit(0)


class _Rebuilder:
    """ReadableSpans from ``courier.flatten``'s tuples. Equal resources and scopes become
    one object across batches: redaction keeps a redacted copy per resource object."""

    def __init__(self) -> None:
        self._resources: dict[bytes, Any] = {}
        self._scopes: dict[bytes, Any] = {}

    def spans(self, resources: list[Any], scopes: list[Any], spans: list[Any]) -> list[ReadableSpan]:
        resource_objects = [_interned(self._resources, item, _resource) for item in resources]
        scope_objects = [None if item is None else _interned(self._scopes, item, _scope) for item in scopes]
        return [_span(fields, resource_objects, scope_objects) for fields in spans]


def _resource(fields: Any) -> Resource:
    attributes, schema_url = fields
    return Resource(attributes, schema_url)


def _scope(fields: Any) -> InstrumentationScope:
    name, version, schema_url, attributes = fields
    return InstrumentationScope(name, version, schema_url, attributes or None)


def _span(fields: Any, resources: list[Resource], scopes: list[InstrumentationScope | None]) -> ReadableSpan:
    (name, context, parent, resource, scope, attributes, events, links, kind, code, description, start,
     end) = fields
    return ReadableSpan(
        name=name, context=_context(context), parent=None if parent is None else _context(parent),
        resource=resources[resource], instrumentation_scope=scopes[scope], attributes=attributes,
        events=[Event(event, attributes_of, timestamp) for event, timestamp, attributes_of in events],
        links=[Link(_context(link_context), link_attributes) for link_context, link_attributes in links],
        kind=SpanKind(kind), status=Status(StatusCode(code), description), start_time=start, end_time=end,
    )


_INTERNED_BOUND = 64


def _interned(known: dict[bytes, Any], item: Any, make: Callable[[Any], Any]) -> Any:
    key = marshal.dumps(item)
    found = known.get(key)
    if found is None:
        if len(known) >= _INTERNED_BOUND:
            known.clear()
        found = known[key] = make(item)
    return found


def _context(fields: Any) -> SpanContext:
    trace_id, span_id, flags, is_remote, state = fields
    return SpanContext(trace_id, span_id, is_remote, TraceFlags(flags), TraceState(state) if state else None)


if __name__ == "__main__":
    main(int(sys.argv[1]))
