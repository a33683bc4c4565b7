"""The TLS, workspace and spool-age settings: the names MLflow's client and the
OpenTelemetry exporter read, their precedence, and one clear line for a bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.settings import error_of

from traced_run import transport
from traced_run.config.sources import load

# No ./traced-run.yaml is found by accident: each test runs in an empty directory.
pytestmark = pytest.mark.usefixtures("cwd")



CA_VARS = ("MLFLOW_TRACKING_SERVER_CERT_PATH", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
           "OTEL_EXPORTER_OTLP_CERTIFICATE", "REQUESTS_CA_BUNDLE")


def test_the_ca_bundle_comes_from_the_first_variable_set_mlflow_s_first(tmp_path: Path) -> None:
    files = {var: tmp_path / f"{var}.pem" for var in CA_VARS}
    for path in files.values():
        path.write_text("x")
    for index, var in enumerate(CA_VARS):
        environ = {name: str(files[name]) for name in CA_VARS[index:]}
        loaded = load(environ)
        assert loaded.settings.ca_bundle == str(files[var])
        assert loaded.sources["ca_bundle"] == f"env {var}"


def test_client_certificate_and_key_from_mlflow_or_otel_names(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    loaded = load({"OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": str(cert),
                   "OTEL_EXPORTER_OTLP_CLIENT_KEY": str(key)})
    assert (loaded.settings.client_cert, loaded.settings.client_key) == (str(cert), str(key))
    loaded = load({"MLFLOW_TRACKING_CLIENT_CERT_PATH": str(cert)})
    assert (loaded.settings.client_cert, loaded.settings.client_key) == (str(cert), None)


def test_a_certificate_path_that_names_nothing_is_said_with_the_fix_at_the_request(tmp_path: Path) -> None:
    """Checked where it is used, not at start: REQUESTS_CA_BUNDLE is set on many machines
    for other tools, and the launcher's quick start-up check takes a path as it is."""
    missing = tmp_path / "nope.pem"
    settings = load({"REQUESTS_CA_BUNDLE": str(missing)}).settings
    answer = transport.request(settings, "https://127.0.0.1:9/x", timeout=1)
    assert answer.status is None
    assert answer.problem == (f"cannot use the CA bundle {missing} (no such file or directory); set "
                              "MLFLOW_TRACKING_SERVER_CERT_PATH to a PEM file of CA certificates")
    settings = load({"MLFLOW_TRACKING_CLIENT_CERT_PATH": str(missing)}).settings
    assert transport.request(settings, "https://127.0.0.1:9/x", timeout=1).problem.startswith(
        f"cannot use the client certificate {missing} (no such file or directory); set "
        "MLFLOW_TRACKING_CLIENT_CERT_PATH")


def test_insecure_tls_and_workspace_from_mlflow_s_names() -> None:
    loaded = load({"MLFLOW_TRACKING_INSECURE_TLS": "true", "MLFLOW_WORKSPACE": "team-a"})
    assert loaded.settings.insecure_tls is True and loaded.settings.workspace == "team-a"


@pytest.mark.parametrize("name", ["Team-A", "a", "-a", "api", "team_a", "x" * 64])
def test_a_workspace_name_mlflow_would_refuse_is_refused_at_start(name: str) -> None:
    assert error_of({"MLFLOW_WORKSPACE": name}).startswith(
        "env MLFLOW_WORKSPACE: workspace: expected an MLflow workspace name")


@pytest.mark.parametrize(("text", "seconds"), [("604800", 604800.0), ("7d", 604800.0), ("2w", 1209600.0),
                                               ("12h", 43200.0), ("90m", 5400.0), ("120s", 120.0)])
def test_spool_max_age_in_seconds_or_with_a_unit(text: str, seconds: float) -> None:
    assert load({"TRACED_RUN_SPOOL_MAX_AGE": text}).settings.spool_max_age == seconds


@pytest.mark.parametrize("text", ["a week", "0", "10s", "400d", "-1d", "true"])
def test_a_bad_spool_max_age_is_one_line(text: str) -> None:
    assert error_of({"TRACED_RUN_SPOOL_MAX_AGE": text}).startswith(
        "env TRACED_RUN_SPOOL_MAX_AGE: spool_max_age: expected")


def test_the_default_spool_max_age_is_a_week() -> None:
    assert load({}).settings.spool_max_age == 7 * 86400
