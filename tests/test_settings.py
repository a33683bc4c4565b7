"""Settings, in process: ``traced_run.config.sources.load`` reads a plain environment
mapping and real YAML files, and either returns the effective settings with the
source that decided each one, or raises one ConfigError line that names where
(file:line, env var or option), the key and the problem, never a secret."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from traced_run.config.settings import SPECS, Settings
from traced_run.config.sources import OPTIONS_ENV, Loaded, load
from traced_run.report import ConfigError

SECRET = "hunter2-s3cret"


@pytest.fixture(autouse=True)
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory, so no ./traced-run.yaml is found by accident."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def with_config(path: Path, **env: str) -> Loaded:
    return load({"TRACED_RUN_CONFIG": str(path), **env})


def options(**given: Any) -> dict[str, str]:
    """The environment entry through which the launcher hands its options on."""
    return {OPTIONS_ENV: json.dumps(given)}


def error_of(environ: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as info:
        load(environ)
    message = str(info.value)
    assert "\n" not in message and message == message.strip(), message
    return message


# -- every row of the table, from every source ------------------------------------------

# name: (YAML value, the value that gives, env text, the value with that env on top)
SAMPLES: dict[str, tuple[Any, Any, str, Any]] = {
    "enabled": (False, False, "true", True),
    "strict": (True, True, "false", False),
    "tracking_uri": ("http://yaml-host:5000/", "http://yaml-host:5000", "https://env-host:8443",
                     "https://env-host:8443"),
    "experiment_id": (12, "12", "34", "34"),
    "experiment_name": ("from-yaml", "from-yaml", " from-env ", "from-env"),
    "run_id": ("run-yaml", "run-yaml", "run-env", "run-env"),
    "workspace": ("team-a", "team-a", " team-b ", "team-b"),
    "username": ("alice", "alice", "bob", "bob"),
    "password": ("yaml-pw", "yaml-pw", "env-pw", "env-pw"),
    "token": ("yaml-token", "yaml-token", "env-token", "env-token"),
    "endpoint": ("http://collector:4318/v1/traces", "http://collector:4318/v1/traces",
                 "https://other:4318/v1/traces/", "https://other:4318/v1/traces"),
    "headers": ({"x-a": "1", "x-b": "2"}, {"x-a": "1", "x-b": "2"}, "x-b=3,x-c=a%2Cb",
                {"x-a": "1", "x-b": "3", "x-c": "a,b"}),
    "ca_bundle": ("/etc/hosts", "/etc/hosts", "/etc", "/etc"),
    "client_cert": ("/etc/hosts", "/etc/hosts", "/etc/passwd", "/etc/passwd"),
    "client_key": ("/etc/passwd", "/etc/passwd", "/etc/hosts", "/etc/hosts"),
    "insecure_tls": (False, False, "true", True),
    "timeout": (3, 3.0, "4.5", 4.5),
    "compression": ("deflate", "deflate", "NONE", "none"),
    "service_name": ("svc-yaml", "svc-yaml", "svc-env", "svc-env"),
    "resource_attributes": ({"team": "a", "flag": True}, {"team": "a", "flag": "true"},
                            "env=prod,team=b", {"team": "b", "flag": "true", "env": "prod"}),
    "exit_timeout": (1.5, 1.5, "7", 7.0),
    "queue_size": (100, 100, "200", 200),
    "spool_dir": ("/var/spool/yaml", "/var/spool/yaml", " /tmp/env-spool ", "/tmp/env-spool"),
    "spool_max_mb": (16, 16, "32", 32),
    "spool_max_age": ("3d", 259200.0, "3600", 3600.0),
    "instrumentation_version": (2, 2, "3", 3),
    "include_content": (False, False, "yes", True),
    "include_binary_content": ("off", False, "1", True),
    "redact": (["tok-[0-9]{4,8}"], ("tok-[0-9]{4,8}",), r"a{1,2}, b\,c ,(x|y)",
               ("a{1,2}", r"b\,c", "(x|y)")),
    "redact_defaults": (False, False, "on", True),
    "redaction_marker": ("<gone>", "<gone>", " *** ", "***"),
    "max_binary_bytes": (1024, 1024, "2048", 2048),
    "session_id": ("batch-7", "batch-7", "batch-8", "batch-8"),
    "user_id": ("alice", "alice", "bob", "bob"),
    "tags": ({"environment": "prod", "version": "1.4.2"}, {"environment": "prod", "version": "1.4.2"},
             "version=1.5.0,git_commit=abc123",
             {"environment": "prod", "version": "1.5.0", "git_commit": "abc123"}),
    "trace_name": ("nightly", "nightly", "hourly", "hourly"),
    "sample_ratio": (0.25, 0.25, "1", 1.0),
    "propagate_context": ("off", False, "1", True),
    "mode": ("mlflow", "mlflow", "OTLP", "otlp"),
}

# name: (value as the launcher writes it into TRACED_RUN_OPTIONS, effective value)
OPTION_SAMPLES: dict[str, tuple[Any, Any]] = {
    "enabled": (False, False),
    "strict": (True, True),
    "tracking_uri": ("http://option-host:1234", "http://option-host:1234"),
    "experiment_id": ("56", "56"),
    "experiment_name": ("from-option", "from-option"),
    "run_id": ("run-option", "run-option"),
    "service_name": ("svc-option", "svc-option"),
}


def test_the_samples_cover_every_setting() -> None:
    yaml_settings = {name for name, spec in SPECS.items() if spec.in_yaml}
    assert set(SAMPLES) == yaml_settings, "add the new setting to SAMPLES"
    with_option = {name for name, spec in SPECS.items() if spec.option and spec.in_yaml}
    assert set(OPTION_SAMPLES) == with_option, "add the new option to OPTION_SAMPLES"


def test_defaults_when_nothing_is_given() -> None:
    loaded = load({})
    assert loaded.settings == Settings()
    assert loaded.sources == {name: "default" for name in SPECS}
    assert loaded.settings.tracking_uri is None and loaded.settings.traces_endpoint is None
    assert loaded.settings.enabled is True and loaded.settings.strict is False
    assert loaded.settings.timeout == 10.0 and loaded.settings.compression == "gzip"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_yaml_then_env_then_option_each_win_over_the_one_below(name: str, tmp_path: Path) -> None:
    spec = SPECS[name]
    yaml_value, from_yaml, env_text, from_env = SAMPLES[name]
    path = write(tmp_path / "c.yaml", yaml.safe_dump({name: yaml_value}))

    loaded = with_config(path)
    assert getattr(loaded.settings, name) == from_yaml
    assert loaded.sources[name] == f"{path}:1"
    assert loaded.sources["config"] == "env TRACED_RUN_CONFIG"

    var = spec.env[0]
    loaded = with_config(path, **{var: env_text})
    assert getattr(loaded.settings, name) == from_env
    assert loaded.sources[name] == (f"{path}:1 + env {var}" if spec.merged else f"env {var}")

    if name in OPTION_SAMPLES:
        given, from_option = OPTION_SAMPLES[name]
        loaded = with_config(path, **{var: env_text}, **options(**{name: given}))
        assert getattr(loaded.settings, name) == from_option
        assert loaded.sources[name] == f"option {spec.option}"


@pytest.mark.parametrize(("name", "var"), [(n, v) for n, s in SPECS.items() for v in s.env])
def test_every_env_var_of_the_table_is_read(name: str, var: str) -> None:
    if name == "config":
        return  # TRACED_RUN_CONFIG is covered by the file tests below
    env_text, expected = SAMPLES[name][2:]
    if SPECS[name].merged:  # without the YAML layer only the env pairs remain
        expected = dict(pair.split("=") for pair in env_text.split(","))
        expected = {k: v.replace("%2C", ",") for k, v in expected.items()}
    loaded = load({var: env_text})
    assert getattr(loaded.settings, name) == expected
    assert loaded.sources[name] == f"env {var}"


def test_mlflow_environment_names_are_honoured() -> None:
    loaded = load({
        "MLFLOW_TRACKING_URI": "https://mlflow.example.com/",
        "MLFLOW_EXPERIMENT_NAME": "agents",
        "MLFLOW_RUN_ID": "0123abcd",
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "MLFLOW_TRACKING_TOKEN": "tok",
    })
    settings = loaded.settings
    assert settings.tracking_uri == "https://mlflow.example.com"
    assert settings.traces_endpoint == "https://mlflow.example.com/v1/traces"
    assert (settings.experiment_name, settings.run_id) == ("agents", "0123abcd")
    assert (settings.username, settings.password, settings.token) == ("alice", "pw", "tok")
    assert load({"MLFLOW_EXPERIMENT_ID": "7"}).settings.experiment_id == "7"


def test_signal_specific_env_var_beats_the_generic_one() -> None:
    both = {"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "3", "OTEL_EXPORTER_OTLP_TIMEOUT": "4"}
    loaded = load(both)
    assert loaded.settings.timeout == 3.0
    assert loaded.sources["timeout"] == "env OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
    # an empty signal-specific variable is unset, so the generic one applies
    loaded = load({**both, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": ""})
    assert loaded.settings.timeout == 4.0
    assert loaded.sources["timeout"] == "env OTEL_EXPORTER_OTLP_TIMEOUT"


@pytest.mark.parametrize("empty", ["", "   "])
def test_an_empty_env_var_counts_as_unset(empty: str, tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "tracking_uri: http://from-yaml:5000\n")
    loaded = with_config(path, MLFLOW_TRACKING_URI=empty, OTEL_EXPORTER_OTLP_TIMEOUT=empty,
                         TRACED_RUN_ENABLED=empty, OTEL_SDK_DISABLED=empty, TRACED_RUN_STRICT=empty,
                         OTEL_EXPORTER_OTLP_HEADERS=empty, MLFLOW_EXPERIMENT_ID=empty)
    assert loaded.settings.tracking_uri == "http://from-yaml:5000"
    assert loaded.sources["tracking_uri"] == f"{path}:1"
    assert loaded.settings.timeout == 10.0 and loaded.sources["timeout"] == "default"
    assert loaded.settings.enabled is True and loaded.settings.strict is False
    assert loaded.settings.headers == {} and loaded.settings.experiment_id is None


def test_an_empty_config_env_var_falls_back_to_the_file_in_the_working_directory(cwd: Path) -> None:
    write(cwd / "traced-run.yaml", "service_name: found\n")
    loaded = load({"TRACED_RUN_CONFIG": ""})
    assert loaded.settings.service_name == "found"
    assert loaded.settings.config == str(cwd / "traced-run.yaml")
    assert loaded.sources["config"] == "found in the working directory"


def test_mappings_merge_key_by_key_across_sources(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "headers:\n  x-team: yaml\n  x-keep: kept\n"
                                      "resource_attributes: {deployment.environment: staging, team: a}\n")
    loaded = with_config(path, OTEL_EXPORTER_OTLP_HEADERS="x-team=env,x-new=n%3D1",
                         OTEL_RESOURCE_ATTRIBUTES="deployment.environment=prod")
    assert loaded.settings.headers == {"x-team": "env", "x-keep": "kept", "x-new": "n=1"}
    assert loaded.sources["headers"] == f"{path}:1 + env OTEL_EXPORTER_OTLP_HEADERS"
    assert loaded.settings.resource_attributes == {"deployment.environment": "prod", "team": "a"}
    assert loaded.sources["resource_attributes"] == f"{path}:4 + env OTEL_RESOURCE_ATTRIBUTES"


def test_otel_sdk_disabled_is_the_kill_switch(tmp_path: Path) -> None:
    loaded = load({"OTEL_SDK_DISABLED": "true"})
    assert loaded.settings.enabled is False
    assert loaded.sources["enabled"] == "env OTEL_SDK_DISABLED"
    assert load({"OTEL_SDK_DISABLED": "false"}).settings.enabled is True
    assert load({"OTEL_SDK_DISABLED": "false"}).sources["enabled"] == "default"
    # it is an environment variable, so it beats the file
    path = write(tmp_path / "c.yaml", "enabled: true\n")
    assert with_config(path, OTEL_SDK_DISABLED="TRUE").settings.enabled is False
    # our own variable is more specific than the OTel SDK's
    loaded = load({"TRACED_RUN_ENABLED": "true", "OTEL_SDK_DISABLED": "true"})
    assert loaded.settings.enabled is True
    assert load({"TRACED_RUN_ENABLED": "off"}).settings.enabled is False


def test_traces_endpoint_is_the_explicit_endpoint_else_mlflows_otlp_route() -> None:
    assert load({"MLFLOW_TRACKING_URI": "http://h:5000//"}).settings.traces_endpoint == \
        "http://h:5000/v1/traces"
    settings = load({"MLFLOW_TRACKING_URI": "http://h:5000",
                     "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}).settings
    assert settings.traces_endpoint == "http://collector:4318/v1/traces"


# -- the experiment: id or name, the highest source naming one decides -------------------


def test_a_higher_source_naming_one_experiment_setting_overrides_a_lower_naming_the_other(
        tmp_path: Path) -> None:
    by_id = write(tmp_path / "id.yaml", "experiment_id: 5\n")
    loaded = with_config(by_id, MLFLOW_EXPERIMENT_NAME="agents")
    assert (loaded.settings.experiment_id, loaded.settings.experiment_name) == (None, "agents")
    assert loaded.sources["experiment_name"] == "env MLFLOW_EXPERIMENT_NAME"

    by_name = write(tmp_path / "name.yaml", "experiment_name: agents\n")
    loaded = with_config(by_name, MLFLOW_EXPERIMENT_ID="9")
    assert (loaded.settings.experiment_id, loaded.settings.experiment_name) == ("9", None)

    loaded = load({"MLFLOW_EXPERIMENT_NAME": "agents", **options(experiment_id="3")})
    assert (loaded.settings.experiment_id, loaded.settings.experiment_name) == ("3", None)
    assert loaded.sources["experiment_id"] == "option --experiment-id"

    loaded = with_config(by_id, **options(experiment_name="from-option"))
    assert (loaded.settings.experiment_id, loaded.settings.experiment_name) == (None, "from-option")


def test_experiment_id_and_name_in_the_same_file_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "experiment_id: 5\nexperiment_name: agents\n")
    message = error_of({"TRACED_RUN_CONFIG": str(path)})
    assert f"experiment_id ({path}:1)" in message
    assert f"experiment_name ({path}:2)" in message
    assert "set only one" in message


def test_experiment_id_and_name_in_the_environment_are_refused(tmp_path: Path) -> None:
    message = error_of({"MLFLOW_EXPERIMENT_ID": "5", "MLFLOW_EXPERIMENT_NAME": "agents"})
    assert "experiment_id (env MLFLOW_EXPERIMENT_ID)" in message
    assert "experiment_name (env MLFLOW_EXPERIMENT_NAME)" in message


def test_experiment_id_and_name_as_options_are_refused() -> None:
    message = error_of(options(experiment_id="5", experiment_name="agents"))
    assert "experiment_id (option --experiment-id)" in message
    assert "experiment_name (option --experiment-name)" in message


# -- the config file: where it is found, ${VAR} ------------------------------------------


def test_traced_run_yaml_in_the_working_directory_is_read(cwd: Path) -> None:
    write(cwd / "traced-run.yaml", "# comment\nsession_id: batch-7\n")
    loaded = load({})
    assert loaded.settings.session_id == "batch-7"
    assert loaded.sources["session_id"] == f"{cwd / 'traced-run.yaml'}:2"
    assert loaded.settings.config == str(cwd / "traced-run.yaml")
    assert loaded.sources["config"] == "found in the working directory"


def test_a_named_config_replaces_the_one_in_the_working_directory(cwd: Path, tmp_path: Path) -> None:
    write(cwd / "traced-run.yaml", "timeout: 2\n")
    write(tmp_path / "other.yaml", "timeout: 3\n")
    write(cwd / "relative.yaml", "timeout: 4\n")
    loaded = load({"TRACED_RUN_CONFIG": str(tmp_path / "other.yaml")})
    assert loaded.settings.timeout == 3.0 and loaded.settings.config == str(tmp_path / "other.yaml")
    loaded = load({"TRACED_RUN_CONFIG": "relative.yaml"})
    assert loaded.settings.timeout == 4.0 and loaded.settings.config == str(cwd / "relative.yaml")
    loaded = load({"TRACED_RUN_CONFIG": "relative.yaml", **options(config=str(tmp_path / "other.yaml"))})
    assert loaded.settings.timeout == 3.0 and loaded.sources["config"] == "option --config"


def test_empty_and_comment_only_files_and_null_values_mean_defaults(tmp_path: Path) -> None:
    for text in ("", "# nothing here\n", "---\n# timeout: 3\n", "null\n",
                 "timeout:\ntracking_uri: ~\n", "\ufefftimeout:\r\n"):
        loaded = with_config(write(tmp_path / "c.yaml", text))
        assert loaded.settings == Settings(config=str(tmp_path / "c.yaml")), text
        assert loaded.sources["timeout"] == "default"


def test_env_vars_are_expanded_in_yaml_strings_and_mapping_values(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "tracking_uri: http://${HOST}:${PORT}\n"
                                      "password: ${PW}\n"
                                      "headers:\n  Authorization: Bearer ${TOKEN}\n"
                                      "timeout: ${T}\n"
                                      "service_name: literal $HOST and $${X\n")
    loaded = with_config(path, HOST="mlflow", PORT="5000", PW="pw", TOKEN="tok", T="2.5")
    assert loaded.settings.tracking_uri == "http://mlflow:5000"
    assert loaded.settings.password == "pw"
    assert loaded.settings.headers == {"Authorization": "Bearer tok"}
    assert loaded.settings.timeout == 2.5
    assert loaded.settings.service_name == "literal $HOST and $${X"


@pytest.mark.parametrize("value", [None, ""])
def test_a_missing_or_empty_var_in_yaml_is_an_error_naming_the_line_and_var(
        value: str | None, tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "timeout: 3\nheaders:\n  Authorization: Bearer ${API_TOKEN}\n")
    environ = {"TRACED_RUN_CONFIG": str(path)}
    if value is not None:
        environ["API_TOKEN"] = value
    message = error_of(environ)
    assert message == f"{path}:3: headers: ${{API_TOKEN}} is not set in the environment"


# -- invalid values: one line, where, which key, what is wrong ---------------------------

YAML_PROBLEMS = [
    ("timeout: abc\n", "timeout", "expected a number of seconds", "'abc'"),
    ("timeout: 0\n", "timeout", "above 0", "'0'"),
    ("timeout: true\n", "timeout", "expected a number of seconds", "'True'"),
    ("exit_timeout: 99999\n", "exit_timeout", "at most 3600", "'99999'"),
    ("include_content: maybe\n", "include_content", "expected true or false", "'maybe'"),
    ("enabled: 2\n", "enabled", "expected true or false", "'2'"),
    ("tracking_uri: ftp://mlflow:5000\n", "tracking_uri", "expected an http:// or https:// URL",
     "'ftp://mlflow:5000'"),
    ("tracking_uri: mlflow:5000\n", "tracking_uri", "expected an http:// or https:// URL", None),
    ("tracking_uri: http://mlflow:port\n", "tracking_uri", "port is not a number", None),
    ("endpoint: http://\n", "endpoint", "with a host", "'http://'"),
    ("tracking_uri: [http://a]\n", "tracking_uri", "expected a string", None),
    ("experiment_id: abc\n", "experiment_id", "numeric MLflow experiment id", "'abc'"),
    ("queue_size: 0\n", "queue_size", "from 1 to 1000000", "'0'"),
    ("queue_size: 1.5\n", "queue_size", "whole number", "'1.5'"),
    ("instrumentation_version: 7\n", "instrumentation_version", "one of 2, 3, 4, 5, 6", "'7'"),
    ("compression: brotli\n", "compression", "gzip, deflate or none", "'brotli'"),
    ("resource_attributes: team=a\n", "resource_attributes", "expected a mapping", "'team=a'"),
    ("resource_attributes: {a: {b: c}}\n", "resource_attributes", "plain values", None),
    ("service_name: {a: b}\n", "service_name", "expected a string", None),
]


@pytest.mark.parametrize(("text", "key", "problem", "got"), YAML_PROBLEMS)
def test_a_wrong_yaml_value_names_file_line_key_and_problem(
        text: str, key: str, problem: str, got: str | None, tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "# settings\nstrict: false\n" + text)
    message = error_of({"TRACED_RUN_CONFIG": str(path)})
    assert message.startswith(f"{path}:3: {key}: "), message
    assert problem in message
    assert ", got " in message
    if got is not None:
        assert message.endswith(f", got {got}"), message


ENV_PROBLEMS = [
    ("OTEL_EXPORTER_OTLP_TIMEOUT", "abc", "timeout", "expected a number of seconds"),
    ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-1", "timeout", "above 0"),
    ("TRACED_RUN_INCLUDE_CONTENT", "maybe", "include_content", "expected true or false"),
    ("TRACED_RUN_ENABLED", "nope", "enabled", "expected true or false"),
    ("OTEL_SDK_DISABLED", "maybe", "enabled", "expected true or false"),
    ("TRACED_RUN_STRICT", "2", "strict", "expected true or false"),
    ("MLFLOW_TRACKING_URI", "localhost:5000", "tracking_uri", "http:// or https://"),
    ("MLFLOW_TRACKING_URI", "file:///tmp/mlruns", "tracking_uri", "http:// or https://"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://h:x/v1/traces", "endpoint", "port is not a number"),
    ("MLFLOW_EXPERIMENT_ID", "my-exp", "experiment_id", "numeric"),
    ("TRACED_RUN_QUEUE_SIZE", "lots", "queue_size", "whole number"),
    ("TRACED_RUN_SPOOL_MAX_MB", "0", "spool_max_mb", "from 1 to 1048576"),
    ("TRACED_RUN_INSTRUMENTATION_VERSION", "1", "instrumentation_version", "one of 2"),
    ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd", "compression", "gzip, deflate or none"),
    ("OTEL_RESOURCE_ATTRIBUTES", "team", "resource_attributes", "key=value pairs"),
]


@pytest.mark.parametrize(("var", "text", "key", "problem"), ENV_PROBLEMS)
def test_a_wrong_env_value_names_the_variable_key_and_problem(
        var: str, text: str, key: str, problem: str) -> None:
    message = error_of({var: text})
    assert message.startswith(f"env {var}: {key}: "), message
    assert problem in message
    assert message.endswith(f", got {text!r}"), message


def test_a_wrong_option_value_names_the_option() -> None:
    message = error_of(options(tracking_uri="mlflow.local"))
    assert message.startswith("option --tracking-uri: tracking_uri: expected an http"), message
    message = error_of(options(experiment_id="x1"))
    assert message.startswith("option --experiment-id: experiment_id: "), message


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '"text"'])
def test_a_damaged_options_variable_is_reported_as_such(raw: str) -> None:
    assert error_of({OPTIONS_ENV: raw}) == f"env {OPTIONS_ENV}: not the JSON the launcher writes"


def test_an_options_variable_naming_a_setting_without_option_is_refused() -> None:
    assert error_of(options(timeout="3")) == f"env {OPTIONS_ENV}: unknown setting 'timeout'"


@pytest.mark.parametrize(("key", "suggestion"), [
    ("tracking_url", "tracking_uri"),
    ("experiment", "experiment_id"),
    ("include_contents", "include_content"),
    ("servicename", "service_name"),
    ("MLFLOW_TRACKING_URI", None),
    ("flavour", None),
])
def test_an_unknown_key_names_the_line_and_suggests_the_closest(
        key: str, suggestion: str | None, tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", f"timeout: 3\n\n{key}: whatever\n")
    message = error_of({"TRACED_RUN_CONFIG": str(path)})
    if suggestion is None:
        assert message == f"{path}:3: unknown key {key!r}"
    else:
        assert message == f"{path}:3: unknown key {key!r} (did you mean {suggestion!r}?)"


@pytest.mark.parametrize("line", ['token:% "s3cr3t-value: 1"', "password:s3cr3t-value: 1",
                                  "s3cr3t value with spaces: 1"])
def test_an_unknown_key_that_is_no_name_is_not_echoed(line: str, tmp_path: Path) -> None:
    """A line whose ': ' went astray makes a key of what was a value, perhaps a password."""
    path = write(tmp_path / "c.yaml", f"timeout: 3\n{line}\n")
    message = error_of({"TRACED_RUN_CONFIG": str(path)})
    assert message == (f"{path}:2: unknown key (not a setting name; is a ': ' missing or "
                       "misplaced on that line?)")


@pytest.mark.parametrize(("text", "line", "column"), [
    ("timeout: 3\nheaders: {a: 1\n", 3, 1),
    ("timeout: 3\n  - nested: wrong\n", 2, 11),
    ("timeout: 3\ntracking_uri: 'http://x\n", 3, 1),
    ("a: 1\n---\nb: 2\n", 2, 1),
    ("timeout: *nowhere\n", 1, 10),
    ("timeout: 3\ntimeout\tx: 4\nservice_name: [\n", None, None),
])
def test_malformed_yaml_names_line_and_column(
        text: str, line: int | None, column: int | None, tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", text)
    message = error_of({"TRACED_RUN_CONFIG": str(path)})
    found = re.fullmatch(rf"{re.escape(str(path))}:(\d+):(\d+): malformed YAML: \S.*", message)
    assert found, message
    if line is not None:
        assert (int(found[1]), int(found[2])) == (line, column), message


@pytest.mark.parametrize(("text", "line"), [
    ("- tracking_uri: http://x\n", 1),
    ("# a list, not a mapping\n\n- a\n- b\n", 3),
    ("just a string\n", 1),
    ("42\n", 1),
])
def test_a_top_level_that_is_not_a_mapping_is_refused(text: str, line: int, tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", text)
    message = error_of({"TRACED_RUN_CONFIG": str(path)})
    assert message == f"{path}:{line}: expected a mapping of settings at the top level"


def test_a_config_file_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    message = error_of({"TRACED_RUN_CONFIG": str(missing)})
    assert message == f"env TRACED_RUN_CONFIG: config: no such file: {str(missing)!r}"
    message = error_of(options(config=str(missing)))
    assert message == f"option --config: config: no such file: {str(missing)!r}"
    message = error_of({"TRACED_RUN_CONFIG": str(tmp_path)})  # a directory is no config file
    assert message.startswith("env TRACED_RUN_CONFIG: config: ") and str(tmp_path) in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_config_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "timeout: 3\n")
    path.chmod(0)
    message = error_of({"TRACED_RUN_CONFIG": str(path)})
    assert message == f"{path}: cannot read the config file: Permission denied"


@pytest.mark.skipif(not os.path.isfile("/proc/self/mem"), reason="needs Linux /proc")
def test_a_config_file_whose_reading_fails_is_refused() -> None:
    """A regular file that cannot be read (as root, where modes do not stop a read):
    reading this process's memory from address 0 fails with EIO."""
    message = error_of({"TRACED_RUN_CONFIG": "/proc/self/mem"})
    assert message == "/proc/self/mem: cannot read the config file: Input/output error"


def test_a_config_file_that_is_not_utf8_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"timeout: 3\nservice_name: caf\xe9\n")
    message = error_of({"TRACED_RUN_CONFIG": str(path)})
    assert message == f"{path}:2: cannot read the config file: not UTF-8 text"


def test_a_control_character_in_the_config_file_is_reported_with_its_place(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "timeout: 3\nservice_name: a\x07b\n")
    message = error_of({"TRACED_RUN_CONFIG": str(path)})
    assert message == f"{path}:2:16: malformed YAML: character #x0007 is not allowed"


def test_an_impossible_date_is_a_wrong_value_not_a_crash(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "timeout: 3\nrun_id: 2024-13-45\n")
    message = error_of({"TRACED_RUN_CONFIG": str(path)})
    assert message == f"{path}:2: run_id: not a valid YAML value: month must be in 1..12"


# -- secrets are never part of a message -------------------------------------------------


@pytest.mark.parametrize("text", [
    f"password: [{SECRET}]\n",
    f"token: {{value: {SECRET}}}\n",
    f"headers: Authorization {SECRET}\n",
    f"headers:\n  Authorization: {{Bearer: {SECRET}}}\n",
    f"headers: [{SECRET}]\n",
])
def test_a_wrong_secret_value_in_yaml_is_not_shown(text: str, tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", text)
    message = error_of({"TRACED_RUN_CONFIG": str(path)})
    assert message.startswith(f"{path}:1: "), message
    assert SECRET not in message
    assert message.endswith("got (value hidden)"), message


@pytest.mark.parametrize("var", ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"])
def test_a_wrong_secret_value_in_env_is_not_shown(var: str) -> None:
    message = error_of({var: f"Authorization Bearer {SECRET}"})
    assert message == f"env {var}: headers: expected key=value pairs separated by commas, " \
                      "got (value hidden)"


@pytest.mark.parametrize("url", [
    f"ftp://alice:{SECRET}@mlflow.example.com",
    f"http://alice:{SECRET}@",
    f"https://alice:{SECRET}@mlflow.example.com:port",
    f"https://alice:p@ss{SECRET}@mlflow.example.com:port",
    f"https://alice:pa/ss{SECRET}@mlflow.example.com",
])
def test_a_password_in_a_wrong_url_is_masked(url: str, tmp_path: Path) -> None:
    message = error_of({"MLFLOW_TRACKING_URI": url})
    assert message.startswith("env MLFLOW_TRACKING_URI: tracking_uri: "), message
    assert SECRET not in message and "***@" in message, message
    path = write(tmp_path / "c.yaml", "endpoint: ${URL}\n")
    message = error_of({"TRACED_RUN_CONFIG": str(path), "URL": url})
    assert message.endswith(", got '${URL}'"), "the file's text, not the variable's value"


def test_a_malformed_secret_line_does_not_echo_the_secret(tmp_path: Path) -> None:
    for text in (f"password: [{SECRET}\n", f"token: '{SECRET}\n", f"password: {SECRET}: x\n"):
        path = write(tmp_path / "c.yaml", text)
        message = error_of({"TRACED_RUN_CONFIG": str(path)})
        assert "malformed YAML" in message and SECRET not in message, message


def test_a_file_naming_both_experiment_settings_is_wrong_even_when_env_decides(tmp_path: Path) -> None:
    """As ``timeout: abc`` in the file is refused even when the environment sets timeout."""
    path = write(tmp_path / "c.yaml", "experiment_id: 5\nexperiment_name: agents\n")
    message = error_of({"TRACED_RUN_CONFIG": str(path), "MLFLOW_EXPERIMENT_NAME": "other"})
    assert message == f"both experiment_id ({path}:1) and experiment_name ({path}:2) are set; set only one"
    message = error_of({"MLFLOW_EXPERIMENT_ID": "5", "MLFLOW_EXPERIMENT_NAME": "agents",
                        **options(experiment_id="3")})
    assert message.startswith("both experiment_id (env MLFLOW_EXPERIMENT_ID) and "), message
