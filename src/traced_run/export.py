"""Turns finished spans into OTLP requests and posts them to MLflow.

The request body is the OpenTelemetry SDK's own protobuf encoding; the post is
one attempt with a timeout the caller chooses and no retry inside: the
delivery thread decides what a failure means (try later, spool, set aside),
and a process that is leaving gives an attempt only what is left of its exit
bound. The experiment name is resolved here, on the delivery thread, once per
process.
"""

from __future__ import annotations

import gzip
import http.client
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan

from traced_run import mlflow_api
from traced_run.enrich import for_mlflow
from traced_run.report import mask_url
from traced_run.settings import Settings
from traced_run.spool import Target

RETRYABLE = {408, 425, 429, 500, 502, 503, 504}
"""Statuses after which the same batch may well be taken later."""
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


DELIVERED = Outcome(True, False, "", 200)


def target_of(settings: Settings) -> Target:
    """Where this process's batches go, known without asking MLflow."""
    endpoint = settings.traces_endpoint or ""
    if settings.experiment_name and not settings.experiment_id:
        return Target(endpoint, None, settings.experiment_name, settings.run_id)
    return Target(endpoint, settings.experiment_id or mlflow_api.DEFAULT_EXPERIMENT_ID, None,
                  settings.run_id)


def encode(spans: Sequence[ReadableSpan], settings: Settings) -> bytes:
    """The OTLP request body for ``spans``, as ``settings`` shape it for MLflow."""
    return bytes(encode_spans([for_mlflow(span, settings) for span in spans]).SerializeToString())


class Sender:
    """Posts encoded batches with this process's headers and credentials."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._experiments: dict[str, str] = {}
        self._uncompressed: set[str] = set()
        """Endpoints that refused a compressed body and took it plain: sent plain from then on."""
        self._tried_plain: set[str] = set()

    def resolve(self, target: Target) -> str:
        """The experiment id for ``target``; raises MlflowError when MLflow cannot say."""
        if target.experiment_id is not None:
            return target.experiment_id
        name = target.experiment_name or ""
        if name not in self._experiments:
            self._experiments[name] = mlflow_api.experiment_id(self._settings, name)
        return self._experiments[name]

    def post(self, payload: bytes, target: Target, timeout: float) -> Outcome:
        settings = self._settings
        try:
            experiment_id = self.resolve(target)
        except mlflow_api.MlflowUnreachable as error:
            return Outcome(False, False, _network_reason(error.reason))
        except mlflow_api.MlflowError as error:
            return Outcome(False, False, str(error))
        headers = {"Content-Type": "application/x-protobuf", "x-mlflow-experiment-id": experiment_id}
        if target.run_id:
            headers["x-mlflow-run-id"] = target.run_id
        headers.update(mlflow_api.auth_headers(settings))
        headers.update(settings.headers)
        compression = "none" if target.endpoint in self._uncompressed else settings.compression
        deadline = time.monotonic() + timeout
        outcome = _send(target.endpoint, payload, headers, compression, timeout)
        if compression != "none" and outcome.status in REFUSED_ENCODING:
            return self._plain_once(target.endpoint, payload, headers, deadline, outcome)
        return outcome

    def _plain_once(self, endpoint: str, payload: bytes, headers: dict[str, str], deadline: float,
                    refused: Outcome) -> Outcome:
        """MLflow before 3.7 reads a gzip or deflate body as protobuf and answers 400 "Invalid
        OpenTelemetry protobuf format": at the first such refusal (once per endpoint and process)
        the batch goes again uncompressed, and if that is taken, so does every later one."""
        if endpoint in self._tried_plain:
            return refused
        plain = _send(endpoint, payload, headers, "none", deadline - time.monotonic())
        if plain.status is not None:
            self._tried_plain.add(endpoint)
        if plain.delivered:
            self._uncompressed.add(endpoint)
            return plain
        return refused if plain.status in REFUSED_ENCODING else plain


def _send(endpoint: str, payload: bytes, headers: dict[str, str], compression: str,
          timeout: float) -> Outcome:
    headers = dict(headers)
    if compression == "gzip":
        payload = gzip.compress(payload, compresslevel=6)
        headers["Content-Encoding"] = "gzip"
    elif compression == "deflate":
        payload = zlib.compress(payload)
        headers["Content-Encoding"] = "deflate"
    request = urllib.request.Request(endpoint, data=payload, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=max(timeout, 0.05)) as response:
            response.read()
        return DELIVERED
    except urllib.error.HTTPError as error:
        reason = f"HTTP {error.code} {error.reason}{_detail(error)}"
        return Outcome(False, error.code in INVALID, reason, error.code)
    except TimeoutError:
        return Outcome(False, False, f"no answer within {timeout:.1f}s")
    except urllib.error.URLError as error:
        return Outcome(False, False, _network_reason(error.reason))
    except (OSError, http.client.HTTPException) as error:
        return Outcome(False, False, _network_reason(error))


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        body = error.read(300).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f": {' '.join(body.split())[:200]}" if body else ""


def _network_reason(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "no answer within the timeout"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return mask_url(str(reason)) or type(reason).__name__  # library text may quote the URL
