"""mode=mlflow: MLflow's own ``mlflow.pydantic_ai.autolog()``, switched on
for the app at its ``import pydantic_ai`` as our pipeline would be.

MLflow then records and delivers the traces itself (its span format, its
async export, its own exit handling); traced-run only points it at the
tracking URI and experiment from the same settings, and puts the session,
user, tags, trace name and run of the settings on each trace. Our queue,
spool, redaction and sampling do not apply in this mode.
"""

from __future__ import annotations

from typing import Any

from traced_run import report
from traced_run.config.settings import Settings
from traced_run.transport import NO_TRACKING_URI


class MlflowMissing(report.ConfigError):
    """mode=mlflow in an environment without the mlflow package."""


def install(settings: Settings) -> None:
    if not settings.tracking_uri:
        raise report.ConfigError(NO_TRACKING_URI)
    try:
        import mlflow
        import mlflow.pydantic_ai
    except ImportError as error:
        raise MlflowMissing(
            f"mode=mlflow needs the mlflow package in the app's environment ({error}); "
            "pip install mlflow, or use mode=otlp"
        ) from None
    mlflow.set_tracking_uri(settings.tracking_uri)
    if settings.experiment_id:
        mlflow.set_experiment(experiment_id=settings.experiment_id)
    elif settings.experiment_name:
        mlflow.set_experiment(settings.experiment_name)
    mlflow.pydantic_ai.autolog(silent=True)
    if settings.session_id or settings.user_id or settings.tags or settings.trace_name or settings.run_id:
        mlflow.tracing.configure(span_processors=[_TraceMetadata(settings)])


class _TraceMetadata:
    """Called by MLflow as each span ends, before it is exported: on the root
    span, the trace's metadata and tags are still MLflow's in-memory ones."""

    def __init__(self, settings: Settings) -> None:
        from mlflow.tracing.constant import TraceMetadataKey, TraceTagKey

        self._metadata: dict[str, str] = {}
        if settings.session_id:
            self._metadata[TraceMetadataKey.TRACE_SESSION] = settings.session_id
        if settings.user_id:
            self._metadata[TraceMetadataKey.TRACE_USER] = settings.user_id
        if settings.run_id:
            self._metadata[TraceMetadataKey.SOURCE_RUN] = settings.run_id
        self._tags = dict(settings.tags)
        if settings.trace_name:
            self._tags[TraceTagKey.TRACE_NAME] = settings.trace_name

    def __call__(self, span: Any) -> None:
        if span.parent_id is not None:
            return
        from mlflow.tracing.trace_manager import InMemoryTraceManager

        manager: Any = InMemoryTraceManager
        with manager.get_instance().get_trace(span.trace_id) as trace:
            if trace is not None:
                trace.info.trace_metadata.update(self._metadata)
                trace.info.tags.update(self._tags)
