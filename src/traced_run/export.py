"""Sends batches of spans to MLflow's OTLP/HTTP receiver.

Built on the delivery thread at its first batch: importing the exporter and
looking the experiment up never run on the app's threads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from opentelemetry.sdk.trace import ReadableSpan

from traced_run import mlflow_api
from traced_run.report import mask_url
from traced_run.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

_EXPORTER_LOGGER = "opentelemetry.exporter.otlp"


class _LastError(logging.Handler):
    """Keeps the exporter's last complaint for our one-line report; having a
    handler also stops Python's last-resort handler printing it to stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage().splitlines()[0]


class Sender:
    """Exports batches; ``send`` says whether MLflow took them, ``problem`` why not."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._exporter: OTLPSpanExporter | None = None
        self._errors = _LastError()
        logging.getLogger(_EXPORTER_LOGGER).addHandler(self._errors)
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
        self._errors.message = None
        result = self._exporter.export([for_mlflow(span) for span in spans])
        if result is SpanExportResult.SUCCESS:
            self.problem = None
            return True
        endpoint = mask_url(self._settings.traces_endpoint or "")
        self.problem = f"{endpoint}: {self._errors.message or 'export failed'}"
        return False

    def abandon(self) -> None:
        """Stop retry back-offs inside the exporter: the process is leaving."""
        if self._exporter is not None:
            self._exporter.shutdown()  # type: ignore[no-untyped-call]
