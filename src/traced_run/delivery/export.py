"""Turns finished spans into OTLP requests and posts them to MLflow.

The request body is the OpenTelemetry SDK's own protobuf encoding; the post is
one attempt with a timeout the caller chooses and no retry inside: the
delivery thread decides what a failure means (try later, spool, set aside),
and a process that is leaving gives an attempt only what is left of its exit
bound. The experiment name is resolved here, on the delivery thread, once per
process.
"""

from __future__ import annotations

import itertools
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

from traced_run import report
from traced_run.config.settings import Settings
from traced_run.delivery.links import version_of
from traced_run.delivery.spool import Target
from traced_run.spans.enrich import for_mlflow
from traced_run.transport import Answer, mlflow_api, post_otlp

INVALID = frozenset(range(400, 500)) - {401, 403, 407, 408, 425, 429}
"""Statuses that say the batch itself (or where it is addressed) is wrong: sending it again cannot
help. Not those that say the same of every batch (credentials) or ask to come back later."""
REFUSED_ENCODING = {400, 415}
"""Statuses a server that cannot read a compressed body answers it with."""


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    invalid: bool
    """MLflow refused the batch itself; it goes aside, not back to the spool."""
    reason: str
    status: int | None = None
    """The HTTP status MLflow answered with, if it answered."""
    retry_after: float | None = None
    """Seconds MLflow (or a proxy) asked to wait before the next attempt (429, 503)."""
    rejected: tuple[Rejected, ...] = ()
    """Of a batch that was delivered once its traces were posted one by one: the traces MLflow
    rejected, to be set aside on their own."""


@dataclass(frozen=True)
class Rejected:
    """One trace of a batch, which MLflow rejected when it was posted alone."""

    payload: bytes
    spans: int
    outcome: Outcome


DELIVERED = Outcome(True, False, "", 200)


def target_of(settings: Settings) -> Target:
    """Where this process's batches go, known without asking MLflow."""
    endpoint = settings.traces_endpoint or ""
    version = version_of(settings)
    if settings.experiment_name and not settings.experiment_id:
        return Target(endpoint, None, settings.experiment_name, settings.run_id, settings.workspace, version)
    return Target(endpoint, settings.experiment_id or mlflow_api.DEFAULT_EXPERIMENT_ID, None,
                  settings.run_id, settings.workspace, version)


def by_trace(payload: bytes) -> list[tuple[bytes, int]]:
    """The request's spans as one request per trace, oldest first: (body, spans)."""
    # Only a rejected batch is read back: protobuf's modules (about 4 MB) wait for one.
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest.FromString(payload)
    traces = list(dict.fromkeys(span.trace_id for resource in request.resource_spans
                                for scope in resource.scope_spans for span in scope.spans))
    parts = []
    for trace_id in traces:
        part = ExportTraceServiceRequest()
        part.CopyFrom(request)
        count = 0
        for resource in part.resource_spans:
            for scope in resource.scope_spans:
                kept = [span for span in scope.spans if span.trace_id == trace_id]
                del scope.spans[:]
                scope.spans.extend(kept)
                count += len(kept)
        parts.append((part.SerializeToString(), count))
    return parts


def encode(spans: Sequence[ReadableSpan], settings: Settings,
           dropped: list[ReadableSpan] | None = None) -> bytes:
    """The OTLP request body for ``spans``, as ``settings`` shape it for MLflow. A span that
    cannot be shaped or encoded (whatever a library or this code raises on it) is left out
    alone, so it costs no other span: said, with its trace and name, and added to ``dropped``."""
    encoded: list[tuple[ReadableSpan, bytes]] = []
    for span in spans:
        try:
            copy = for_mlflow(span, settings)
            encoded.append((copy, _span(copy)))
        except Exception as error:
            _say_dropped(span, error)
            if dropped is not None:
                dropped.append(span)
    return _request(encoded)


SAID_DROPS = 10
"""Spans dropped as unencodable that a process names one by one: past them (a library that
fails on every span) they are only counted, in the exit line, not a line each on the app's stderr."""
_drops = itertools.count()


def _say_dropped(span: ReadableSpan, error: Exception) -> None:
    said = next(_drops)
    if said > SAID_DROPS:
        return
    if said == SAID_DROPS:
        report.say("more spans could not be encoded; they are counted in the exit line")
        return
    context = span.get_span_context()
    trace = f"{context.trace_id:032x}" if context is not None else "?"
    # Bounded: a library's message may quote the whole value it failed on.
    why = f"{type(error).__name__}: {error}"[:300]
    report.say(f"dropped span {span.name[:200]!r} of trace {trace}: it could not be encoded ({why})")


# -- the OTLP request, written as protobuf's wire format ------------------------------------
#
# The same bytes the SDK's encode_spans(...).SerializeToString() gives (tests/unit/test_enrich.py
# compares them), but for a text with a lone surrogate, which the SDK leaves out, written
# directly: the SDK builds a protobuf object per attribute, span and level and copies each
# into its parent, which cost the delivery thread more than all the rest of the encoding
# together. Fields go in field-number order, as protobuf writes them;
# the field numbers are opentelemetry-proto's (trace/v1/trace.proto, common/v1/common.proto).

def request_bytes(spans: Sequence[ReadableSpan]) -> bytes:
    """An ``ExportTraceServiceRequest`` of ``spans``, grouped by resource, then scope.
    Resources are told apart by identity (hashing one hashes all its attributes, for every
    span): equal resources that are distinct objects each get a group, where the SDK makes one."""
    return _request([(span, _span(span)) for span in spans])


def _request(spans: Sequence[tuple[ReadableSpan, bytes]]) -> bytes:
    """``request_bytes`` of spans already encoded, each beside its encoding."""
    grouped: dict[int, tuple[Resource, dict[InstrumentationScope | None, list[bytes]]]] = {}
    for span, encoded_span in spans:
        _, scopes = grouped.setdefault(id(span.resource), (span.resource, {}))
        scopes.setdefault(span.instrumentation_scope or None, []).append(encoded_span)
    out = []
    for resource, scopes in grouped.values():
        body = [_message(b"\x0a", _attributes(b"\x0a", resource.attributes))]
        for scope, encoded in scopes.items():
            scope_body = [_message(b"\x0a", _scope(scope)), *(_message(b"\x12", span) for span in encoded)]
            if scope is not None and scope.schema_url:
                scope_body.append(_text(b"\x1a", scope.schema_url))
            body.append(_message(b"\x12", b"".join(scope_body)))
        if resource.schema_url:
            body.append(_text(b"\x1a", resource.schema_url))
        out.append(_message(b"\x0a", b"".join(body)))
    return b"".join(out)


def _span(span: ReadableSpan) -> bytes:
    context = span.get_span_context()
    assert context is not None  # a finished SDK span always has one
    parent = span.parent
    out = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
    if context.trace_state:
        out.append(_text(b"\x1a", ",".join(f"{key}={value}" for key, value in context.trace_state.items())))
    if parent is not None:
        out += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    if span.name:
        out.append(_text(b"\x2a", span.name))
    out += (b"\x30", _varint(span.kind.value + 1))  # the protobuf enum counts UNSPECIFIED first
    if span.start_time:
        out += (b"\x39", _FIXED64.pack(span.start_time))
    if span.end_time:
        out += (b"\x41", _FIXED64.pack(span.end_time))
    out.append(_attributes(b"\x4a", span.attributes))
    out.append(_count(b"\x50", span.dropped_attributes))
    for event in span.events:
        event_body = (b"\x09" + _FIXED64.pack(event.timestamp) if event.timestamp else b"") + (
            _text(b"\x12", event.name) if event.name else b"") + _attributes(b"\x1a", event.attributes) + \
            _count(b"\x20", event.dropped_attributes)
        out.append(_message(b"\x5a", event_body))
    out.append(_count(b"\x60", span.dropped_events))
    for link in span.links:
        link_body = b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big") + b"\x12\x08" + \
            link.context.span_id.to_bytes(8, "big") + _attributes(b"\x22", link.attributes) + \
            _count(b"\x28", link.dropped_attributes) + b"\x35" + _FIXED32.pack(_flags(link.context))
        out.append(_message(b"\x6a", link_body))
    out.append(_count(b"\x70", span.dropped_links))
    status = span.status
    code = status.status_code.value
    out.append(_message(b"\x7a", (_text(b"\x12", status.description) if status.description else b"")
                        + (b"\x18" + _varint(code) if code else b"")))
    out += (b"\x85\x01", _FIXED32.pack(_flags(parent)))
    return b"".join(out)


def _flags(parent: SpanContext | None) -> int:
    """SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE, and IS_REMOTE for a remote parent."""
    return 0x300 if parent is not None and parent.is_remote else 0x100


def _scope(scope: InstrumentationScope | None) -> bytes:
    if scope is None:
        return b""
    return (_text(b"\x0a", scope.name) if scope.name else b"") + (
        _text(b"\x12", scope.version) if scope.version else b"") + _attributes(b"\x1a", scope.attributes)


_KEYS: dict[str, bytes] = {}
"""A key's encoded field, by key: a process uses a few dozen keys, on every span; an app
whose keys keep changing (an id in a key) empties it at ``_KEYS_BOUND`` instead of growing."""
_KEYS_BOUND = 4096


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Each (key, value) as a ``KeyValue`` field ``tag``; a value of a type OTLP has none for
    is left out, as the SDK leaves it out (text that is not UTF-8 the SDK leaves out too; here
    it is kept, see ``_text``)."""
    if not attributes:
        return b""
    out = []
    for key, value in attributes.items():
        encoded = _KEYS.get(key)
        if encoded is None:
            if len(_KEYS) >= _KEYS_BOUND:
                _KEYS.clear()
            encoded = _KEYS[key] = _text(b"\x0a", key)
        try:
            out.append(_message(tag, encoded + _message(b"\x12", _value(value))))
        except (TypeError, ValueError):
            continue
    return b"".join(out)


def _value(value: Any) -> bytes:
    """An ``AnyValue``; its one field is written even when it holds its type's default."""
    kind = type(value)
    if kind is str:
        return _text(b"\x0a", value)
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    if kind is int:
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)
    if kind is float:
        return b"\x21" + _DOUBLE.pack(value)
    # Anything else as the SDK takes it, in its order (a str or int subclass, a tuple, ...).
    if value is None:
        return b""
    if isinstance(value, bool):
        return _value(bool(value))
    if isinstance(value, str):
        return _value(str(value))
    if isinstance(value, int):
        return _value(int(value))
    if isinstance(value, float):
        return _value(float(value))
    if isinstance(value, bytes):
        return _message(b"\x3a", value)
    if isinstance(value, Sequence):
        return _message(b"\x2a", b"".join(_message(b"\x0a", _value(item)) for item in value))
    if isinstance(value, Mapping):
        return _message(b"\x32", b"".join(_message(b"\x0a", _text(b"\x0a", str(key)) + _message(
            b"\x12", _value(item))) for key, item in value.items()))
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _text(tag: bytes, text: str) -> bytes:
    try:
        return _message(tag, text.encode())
    except UnicodeEncodeError:
        # A lone surrogate (a file name as os.listdir decodes it, in an exception's message)
        # has no UTF-8: it is written as its escape, \udcff, and the rest of the text kept.
        return _message(tag, text.encode("utf-8", "backslashreplace"))


def _message(tag: bytes, body: bytes) -> bytes:
    return tag + _varint(len(body)) + body


def _count(tag: bytes, count: int) -> bytes:
    return tag + _varint(count) if count else b""


_ONE_BYTE = [bytes([n]) for n in range(0x80)]


def _varint(number: int) -> bytes:
    if number < 0x80:
        return _ONE_BYTE[number]
    out = bytearray()
    while number > 0x7F:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


_FIXED64 = struct.Struct("<Q")
_FIXED32 = struct.Struct("<I")
_DOUBLE = struct.Struct("<d")


class Sender:
    """Posts encoded batches with this process's headers and credentials."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._experiments: dict[tuple[str | None, str], str] = {}
        self._plain = replace(settings, compression="none")
        self._uncompressed: set[str] = set()
        """Endpoints that refused a compressed body and took it plain: sent plain from then on."""
        self._tried_plain: set[str] = set()
        self.on_send: Callable[[], None] | None = None
        """Called as a batch goes out (the experiment known): from then on MLflow may store it."""

    def resolve(self, target: Target) -> str:
        """The experiment id for ``target`` (in its workspace); raises MlflowError when
        MLflow cannot say."""
        if target.experiment_id is not None:
            return target.experiment_id
        key = (target.workspace, target.experiment_name or "")
        if key not in self._experiments:
            self._experiments[key] = mlflow_api.experiment_id(self._settings, key[1], target.workspace)
        return self._experiments[key]

    def post(self, payload: bytes, target: Target, timeout: float) -> Outcome:
        """One attempt; any other answer than 2xx (a redirect too) is a failure the Outcome names."""
        try:
            experiment_id = self.resolve(target)
        except mlflow_api.MlflowUnreachable as error:
            return Outcome(False, False, error.reason)
        except mlflow_api.ExperimentRefused as error:
            return Outcome(False, self._own_refusal(target, error.wrong_workspace), str(error))
        except mlflow_api.MlflowError as error:
            return Outcome(False, False, str(error), retry_after=error.retry_after)
        endpoint = target.endpoint
        settings = self._plain if endpoint in self._uncompressed else self._settings
        deadline = time.monotonic() + timeout
        if self.on_send is not None:
            self.on_send()
        answer = post_otlp(settings, endpoint, payload, experiment_id, target.run_id, target.workspace,
                           timeout)
        if (answer.status in REFUSED_ENCODING and settings.compression != "none"
                and endpoint not in self._tried_plain):
            answer = self._plain_once(endpoint, payload, experiment_id, target, deadline, answer)
        if answer.ok:
            return DELIVERED
        invalid = answer.status in INVALID and self._own_refusal(target, answer.wrong_workspace)
        return Outcome(False, invalid, answer.problem, answer.status, answer.retry_after)

    def _own_refusal(self, target: Target, wrong_workspace: bool) -> bool:
        """Whether a refusal is the batch's own. A workspace the settings name that does not
        exist (yet) is the settings' fault: every batch waits for it. A spooled batch's workspace,
        written under other settings, is its own: it must not hold back the batches behind it."""
        return not wrong_workspace or target.workspace != self._settings.workspace

    def _plain_once(self, endpoint: str, payload: bytes, experiment_id: str, target: Target,
                    deadline: float, refused: Answer) -> Answer:
        """MLflow before 3.7 reads a gzip or deflate body as protobuf and answers 400 "Invalid
        OpenTelemetry protobuf format": at the first such refusal (once per endpoint and process)
        the batch goes again uncompressed, and if that is taken, so does every later one."""
        remaining = max(deadline - time.monotonic(), 0.05)
        plain = post_otlp(self._plain, endpoint, payload, experiment_id, target.run_id, target.workspace,
                          remaining)
        if plain.status is not None:
            self._tried_plain.add(endpoint)
        if plain.ok:
            self._uncompressed.add(endpoint)
            return plain
        return refused if plain.status in REFUSED_ENCODING else plain

    def post_by_trace(self, payload: bytes, target: Target, timeout: float) -> Outcome:
        """``post``; when MLflow rejects a batch of several traces (it stores a request
        all or nothing), each trace is posted alone, once, within the same ``timeout``:
        delivered then, with the traces it rejected in ``rejected``. When MLflow fails
        meanwhile, the batch is not delivered (a trace sent twice is stored once)."""
        deadline = time.monotonic() + timeout
        outcome = self.post(payload, target, timeout)
        # Only MLflow's answer to the post can blame a trace; a refused experiment is every trace's.
        parts = by_trace(payload) if outcome.invalid and outcome.status is not None else []
        if len(parts) < 2:
            return outcome
        rejected = []
        for part, spans in parts:
            left = deadline - time.monotonic()
            if left <= 0:  # no time to isolate it: the batch goes aside whole, as it was
                return outcome
            alone = self.post(part, target, left)
            if alone.invalid:
                rejected.append(Rejected(part, spans, alone))
            elif not alone.delivered:
                return alone
        if len(rejected) == len(parts):
            return outcome
        return Outcome(True, False, outcome.reason, outcome.status, rejected=tuple(rejected))
