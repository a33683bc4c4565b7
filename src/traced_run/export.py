"""Sends batches of spans to MLflow's OTLP/HTTP receiver.

Built on the delivery thread at its first batch: importing the exporter and
looking the experiment up never run on the app's threads.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from opentelemetry.sdk.trace import ReadableSpan

from traced_run import mlflow_api
from traced_run.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

_EXPORTER_LOGGER = "opentelemetry.exporter.otlp"


class _ExporterLog(logging.Handler):
    """The exporter says why a batch failed only in log records. Keep the first
    record of the current attempt for our one-line report, and tell the sender
    when the exporter is about to back off and retry. Being a handler also
    keeps Python's last-resort handler from printing these records to stderr."""

    def __init__(self, on_retry: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.thread: threading.Thread | None = None
        self.message: str | None = None
        self._on_retry = on_retry

    def emit(self, record: logging.LogRecord) -> None:
        if threading.current_thread() is not self.thread:  # the app's own exporter, not ours
            return
        if self.message is None:
            self.message = record.getMessage().splitlines()[0]
        if str(record.msg).startswith("Transient error"):
            self._on_retry()


_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")
_STATUS = re.compile(r"code: (\d{3}), reason: ([^,]+)")


def _reason(message: str | None) -> str:
    """The exporter's log line, cut down to what a user acts on."""
    if not message:
        return "export failed"
    if errno := _ERRNO.search(message):
        return errno.group(1).strip().lower()
    if status := _STATUS.search(message):
        return f"HTTP {status.group(1)} {status.group(2).strip()}"
    if "timed out" in message.lower():
        return "no answer within the export timeout"
    if transient := re.match(r"Transient error (.+?) encountered", message):
        return transient.group(1)
    return message[:200]


class Sender:
    """Exports batches; ``send`` says whether MLflow took them, ``problem`` why not."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._exporter: OTLPSpanExporter | None = None
        self._log = _ExporterLog(self._retrying)
        self._leaving = False
        self._in_retry = False
        logging.getLogger(_EXPORTER_LOGGER).addHandler(self._log)
        self.problem: str | None = None

    def _build(self) -> OTLPSpanExporter:
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        settings = self._settings
        headers = {"x-mlflow-experiment-id": mlflow_api.experiment_id(settings)}
        if settings.run_id:
            headers["x-mlflow-run-id"] = settings.run_id
        headers.update(mlflow_api.auth_headers(settings))
        headers.update(settings.headers)
        return OTLPSpanExporter(
            endpoint=settings.traces_endpoint,
            headers=headers,
            timeout=settings.timeout,
            compression=Compression(settings.compression),
        )

    def prepare(self) -> bool:
        """Build the exporter (imports, experiment lookup) unless built already."""
        if self._exporter is None:
            try:
                self._exporter = self._build()
            except mlflow_api.MlflowError as error:
                self.problem = str(error)
                return False
        return True

    def send(self, spans: Sequence[ReadableSpan]) -> bool:
        from opentelemetry.sdk.trace.export import SpanExportResult

        from traced_run.enrich import for_mlflow

        if not self.prepare() or self._exporter is None:
            return False
        self._log.thread = threading.current_thread()
        self._log.message = None
        self._in_retry = False
        result = self._exporter.export([for_mlflow(span) for span in spans])
        if result is SpanExportResult.SUCCESS:
            self.problem = None
            return True
        self.problem = _reason(self._log.message)
        return False

    def _retrying(self) -> None:
        self._in_retry = True
        if self._leaving:
            self.abandon()

    def leave(self) -> None:
        """The process is exiting: a batch that fails now is not retried, so
        that a refusing MLflow costs the exit one attempt, not the exit bound."""
        self._leaving = True
        if self._in_retry:
            self.abandon()

    def abandon(self) -> None:
        """Stop the exporter, interrupting its back-off: nothing more will be sent."""
        if self._exporter is not None:
            self._exporter.shutdown()  # type: ignore[no-untyped-call]
