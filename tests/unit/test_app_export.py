"""Which of the app's exporters count as sending to traced-run's MLflow, and what is said then."""

from __future__ import annotations

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

from traced_run.config.settings import Settings
from traced_run.pipeline.app_export import AppExports


def provider(endpoint: str, headers: dict[str, str], *, batch: bool = True) -> TracerProvider:
    made = TracerProvider()
    exporter = OTLPSpanExporter(endpoint=endpoint, headers=headers)
    made.add_span_processor(BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter))
    return made


OURS = Settings(tracking_uri="http://mlflow.local:5000", experiment_id="7")


@pytest.mark.parametrize(("endpoint", "headers", "batch"), [
    ("http://MLflow.local:5000/v1/traces/", {"X-MLflow-Experiment-Id": "3"}, True),
    ("http://mlflow.local:5000/v1/traces", {"x-mlflow-experiment-id": "3"}, False),
])
def test_an_exporter_to_the_same_mlflow_into_another_experiment_is_left_to_the_app_and_said(
        endpoint: str, headers: dict[str, str], batch: bool, capfd: pytest.CaptureFixture[str]) -> None:
    assert AppExports(OURS).left_to_app(provider(endpoint, headers, batch=batch))
    out, err = capfd.readouterr()
    assert out == ""
    assert err.count("traced-run:") == 1
    assert "experiment 3 of the same MLflow" in err and "its own experiment 7" in err


@pytest.mark.parametrize(("endpoint", "headers"), [
    ("http://mlflow.local:5000/v1/traces", {"x-mlflow-experiment-id": "7"}),  # the same experiment
    ("http://mlflow.local:5001/v1/traces", {"x-mlflow-experiment-id": "3"}),  # another server
    ("http://mlflow.local:5000/otlp/v1/traces", {"x-mlflow-experiment-id": "3"}),
    ("http://mlflow.local:5000/v1/traces", {}),  # MLflow stores nothing without an experiment
])
def test_other_exporters_are_joined_as_usual(endpoint: str, headers: dict[str, str],
                                             capfd: pytest.CaptureFixture[str]) -> None:
    assert not AppExports(OURS).left_to_app(provider(endpoint, headers))
    assert capfd.readouterr().err == ""
