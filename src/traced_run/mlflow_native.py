"""mode=mlflow: MLflow's own ``mlflow.pydantic_ai.autolog()``, switched on
for the app at its ``import pydantic_ai`` as our pipeline would be.

MLflow then records and delivers the traces itself (its span format, its
async export, its own exit handling); traced-run only points it at the
tracking URI and experiment from the same settings. Our queue, spool,
redaction and sampling do not apply in this mode.
"""

from __future__ import annotations

from traced_run import report
from traced_run.settings import Settings


class MlflowMissing(report.ConfigError):
    """mode=mlflow in an environment without the mlflow package."""


def install(settings: Settings) -> None:
    if not settings.tracking_uri:
        raise report.ConfigError(
            "no MLflow tracking URI: set MLFLOW_TRACKING_URI, --tracking-uri or tracking_uri"
        )
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
