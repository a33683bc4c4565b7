"""Turns finished spans into OTLP requests and posts them to MLflow.

The request body is the OpenTelemetry SDK's own protobuf encoding; the post is
one attempt with a timeout the caller chooses and no retry inside: the
delivery thread decides what a failure means (try later, spool, set aside),
and a process that is leaving gives an attempt only what is left of its exit
bound. The experiment name is resolved here, on the delivery thread, once per
process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan

from traced_run import mlflow_api
from traced_run.enrich import for_mlflow
from traced_run.settings import Settings
from traced_run.spool import Target
from traced_run.transport import Answer, post_otlp

INVALID = {400, 404, 413, 415, 422}
"""Statuses that say the batch itself (or where it is addressed) is wrong: sending it again cannot help."""
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
    if settings.experiment_name and not settings.experiment_id:
        return Target(endpoint, None, settings.experiment_name, settings.run_id, settings.workspace)
    return Target(endpoint, settings.experiment_id or mlflow_api.DEFAULT_EXPERIMENT_ID, None,
                  settings.run_id, settings.workspace)


def by_trace(payload: bytes) -> list[tuple[bytes, int]]:
    """The request's spans as one request per trace, oldest first: (body, spans)."""
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


def encode(spans: Sequence[ReadableSpan], settings: Settings) -> bytes:
    """The OTLP request body for ``spans``, as ``settings`` shape it for MLflow."""
    return bytes(encode_spans([for_mlflow(span, settings) for span in spans]).SerializeToString())


class Sender:
    """Posts encoded batches with this process's headers and credentials."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._experiments: dict[tuple[str | None, str], str] = {}
        self._plain = replace(settings, compression="none")
        self._uncompressed: set[str] = set()
        """Endpoints that refused a compressed body and took it plain: sent plain from then on."""
        self._tried_plain: set[str] = set()

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
        except mlflow_api.MlflowError as error:
            return Outcome(False, False, str(error))
        endpoint = target.endpoint
        settings = self._plain if endpoint in self._uncompressed else self._settings
        deadline = time.monotonic() + timeout
        answer = post_otlp(settings, endpoint, payload, experiment_id, target.run_id, target.workspace,
                           timeout)
        if (answer.status in REFUSED_ENCODING and settings.compression != "none"
                and endpoint not in self._tried_plain):
            answer = self._plain_once(endpoint, payload, experiment_id, target, deadline, answer)
        if answer.ok:
            return DELIVERED
        # A workspace that does not exist (yet) is the settings' fault, not the batch's: it waits.
        invalid = answer.status in INVALID and not answer.wrong_workspace
        return Outcome(False, invalid, answer.problem, answer.status)

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
        parts = by_trace(payload) if outcome.invalid else []
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
        return Outcome(True, False, outcome.reason, outcome.status, tuple(rejected))
