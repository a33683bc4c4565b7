"""Links each trace to its agent version (an MLflow LoggedModel) and its run, with no code in the app.

MLflow's OTLP receiver reads no model id from spans or resources: the link is trace
metadata (``mlflow.modelId``, ``mlflow.sourceRun``) set by StartTraceV3, posted with the
trace's own id, request time, duration and state once the batch holding its root was
accepted. MLflow merges it into the stored trace (previews, tokens, session and user
stay) and marks the trace's info final, so it goes last, once per trace, from the delivery
thread. A link MLflow did not answer puts its batch back in the spool: sent again (MLflow
stores a re-sent span once), its links are made then. A server without the API (or a
collector in front of MLflow) gets none.

The version is ``model_id`` (MLFLOW_ACTIVE_MODEL_ID), else per ``agent_version``: the
git commit the app runs from, a named version, or none. It travels with a spooled batch
(``Target.version``), so whichever process sends the batch links it as its writer meant.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from traced_run import report
from traced_run.config import git
from traced_run.config.settings import Settings
from traced_run.delivery.spool import Target
from traced_run.transport import fields, mlflow_api

MODEL_ID = "mlflow.modelId"
SOURCE_RUN = "mlflow.sourceRun"
_ERROR = 2
"""OTLP's STATUS_CODE_ERROR."""

_versions: dict[tuple[str | None, str, str], str | None] = {}
"""No lock: a child forked while the delivery thread reads the checkout would inherit it held
(its own delivery thread and ``os._exit`` then waited for ever); reading it twice is harmless."""


def version_of(settings: Settings) -> str | None:
    """What this process's traces are linked to, as ``Target.version`` keeps it:
    ``model:<id>``, ``name:<name>``, ``git:<tags as JSON>``, or None. The git checkout is
    read once per process and working directory (the delivery thread reads it first)."""
    try:
        key = (settings.model_id, settings.agent_version, os.getcwd())
    except OSError:  # the working directory was removed: no checkout to read
        return _version(settings, None)
    if key not in _versions:
        _versions[key] = _version(settings, Path(key[2]))
    return _versions[key]


def _version(settings: Settings, directory: Path | None) -> str | None:
    if settings.model_id:
        return "model:" + settings.model_id
    if settings.agent_version == "off":
        return None
    if settings.agent_version != "git":
        return "name:" + settings.agent_version
    try:
        checkout = None if directory is None else git.read(directory)
    except git.GitUnreadable as error:
        if not error.usual:  # a detached HEAD is left to the doctor: nobody asked for a version
            report.say(f"traces are linked to no git version: {error}")
        return None
    return None if checkout is None else "git:" + json.dumps(checkout.tags(), sort_keys=True)


@dataclass(frozen=True)
class Root:
    """A trace's root span, as the OTLP request has it."""

    trace_id: bytes
    start: int
    end: int
    error: bool


def _spans(payload: bytes) -> Iterator[dict[int, int | bytes]]:
    """Each span of an ExportTraceServiceRequest, as its fields by number."""
    for number, resource in fields(payload) or []:
        if number != 1 or not isinstance(resource, bytes):
            continue
        for kind, scope in fields(resource) or []:
            if kind != 2 or not isinstance(scope, bytes):
                continue
            for field, span in fields(scope) or []:
                if field == 2 and isinstance(span, bytes):
                    yield dict(fields(span) or [])


def roots(payload: bytes) -> list[Root]:
    """The spans with no parent: each ends a trace (a span whose parent is in another process
    is that process's to link)."""
    found = []
    for span in _spans(payload):
        trace, start, end, status = span.get(1), span.get(7), span.get(8), span.get(15, b"")
        if span.get(4) or not isinstance(trace, bytes) or not isinstance(start, bytes) \
                or not isinstance(end, bytes) or not isinstance(status, bytes):
            continue
        code = dict(fields(status) or []).get(3)
        found.append(Root(trace, int.from_bytes(start, "little"), int.from_bytes(end, "little"),
                          code == _ERROR))
    return found


def trace_ids(payload: bytes) -> set[bytes]:
    return {trace for span in _spans(payload) if isinstance(trace := span.get(1), bytes)}


def trace_info(root: Root, experiment_id: str, metadata: dict[str, str]) -> dict[str, object]:
    """StartTraceV3's TraceInfoV3, in protobuf's JSON form, of the trace ``root`` ends."""
    started = datetime.datetime.fromtimestamp(root.start // 1_000_000 / 1000, datetime.timezone.utc)
    return {
        "trace_id": "tr-" + root.trace_id.hex(),
        "trace_location": {"type": "MLFLOW_EXPERIMENT",
                           "mlflow_experiment": {"experiment_id": experiment_id}},
        "request_time": started.strftime("%Y-%m-%dT%H:%M:%S.") + f"{started.microsecond // 1000:03d}Z",
        "execution_duration": f"{max(0, root.end - root.start) // 1_000_000 / 1000:.3f}s",
        "state": "ERROR" if root.error else "OK",
        "trace_metadata": metadata,
    }


class Linker:
    """The delivery thread's own: makes the links of each batch MLflow took."""

    def __init__(self, settings: Settings, experiment_of: Callable[[Target], str]) -> None:
        self._settings = settings
        self._experiment_of = experiment_of
        self._models: dict[tuple[str | None, str, str], str | None] = {}
        self._version: str | None = None
        """The server's MLflow release, once asked."""
        own_route = f"{settings.tracking_uri}/v1/traces"
        # Spans posted to a collector may reach MLflow after their link, which would then make the trace.
        self._off = not settings.tracking_uri or settings.traces_endpoint != own_route

    def link(self, payload: bytes, target: Target, rejected: Sequence[bytes], timeout: float) -> str | None:
        """Link the traces whose roots ``payload`` holds (but those MLflow ``rejected``) within
        ``timeout``. None when done, or when MLflow cannot take them (said once); else why MLflow
        did not answer: the batch is to be sent again later."""
        if self._off or (target.version is None and target.run_id is None):
            return None
        skipped = set().union(*(trace_ids(part) for part in rejected))
        found = [root for root in roots(payload) if root.trace_id not in skipped]
        if not found:
            return None
        deadline = time.monotonic() + timeout
        try:
            if not self._server_links(deadline):
                return None
            experiment_id = self._experiment_of(target)
            metadata = self._metadata(target, experiment_id, deadline)
            for root in found if metadata else ():
                left = deadline - time.monotonic()
                if left <= 0:
                    return "no time left to link its traces"
                mlflow_api.finish_trace(self._settings, target.workspace,
                                        trace_info(root, experiment_id, metadata), left)
        except mlflow_api.MlflowUnreachable as error:
            return error.reason
        except mlflow_api.MlflowHttpError as error:
            if error.status == 429 or error.status >= 500:
                return str(error)
            self._refused(error)
        except mlflow_api.MlflowError as error:
            self._refused(error)
        return None

    def _server_links(self, deadline: float) -> bool:
        """Whether the server can take links, asked once per process."""
        if self._version is None:
            self._version = mlflow_api.server_version(self._settings, max(0.0, deadline - time.monotonic()))
            if not mlflow_api.links_traces(self._version):
                self._off = True
                report.say(f"traces are not linked to their agent version or run: MLflow {self._version} "
                           "cannot add links to a trace it stored from OTLP "
                           f"(MLflow {mlflow_api.LINKS_SINCE} can)")
        return not self._off

    def _metadata(self, target: Target, experiment_id: str, deadline: float) -> dict[str, str]:
        metadata = {SOURCE_RUN: target.run_id} if target.run_id else {}
        if target.version is None:
            return metadata
        key = (target.workspace, experiment_id, target.version)
        if key not in self._models:
            self._models[key] = self._model(target.workspace, experiment_id, target.version, deadline)
        model = self._models[key]
        return {**metadata, MODEL_ID: model} if model else metadata

    def _model(self, workspace: str | None, experiment_id: str, version: str, deadline: float) -> str | None:
        """The LoggedModel id of ``version``; None when MLflow refuses it (asked once: every
        later trace would get the same answer)."""
        kind, _, value = version.partition(":")
        if kind == "model":
            return value
        try:
            return mlflow_api.logged_model(self._settings, experiment_id, workspace,
                                           json.loads(value) if kind == "git" else {},
                                           value if kind == "name" else None,
                                           max(0.0, deadline - time.monotonic()))
        except mlflow_api.MlflowHttpError as error:
            if error.status == 429 or error.status >= 500:
                raise
            self._refused(error)
            return None

    def _refused(self, error: mlflow_api.MlflowError) -> None:
        if isinstance(error, mlflow_api.MlflowHttpError) and error.status == 404 \
                and error.error_code in ("", "ENDPOINT_NOT_FOUND"):
            self._off = True
            report.say(f"traces are not linked to their agent version or run: this MLflow has no API for it "
                       f"({error}); `traced-run doctor` says so too")
            return
        report.say(f"traces are not linked to their agent version or run: {error}")
