"""Hostile settings (issue 16): a config file planted in the working directory,
secrets in odd shapes, inputs without bounds. Each test here failed on 066f5f4.

These run ``traced_run.config.sources.load`` in process on a plain environment mapping;
tests/test_settings_security_launched.py runs the launcher and the env-only bootstrap
as real processes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.hostile import DEEP, NOT_UTF8, SECRET, UNNAMED_MAY_SET, ignored_line
from support.settings import SAMPLES, error_of

from traced_run import report
from traced_run.config import sources
from traced_run.config.settings import SPECS, Settings
from traced_run.config.sources import OPTIONS_ENV, load
from traced_run.report import mask_url

# No ./traced-run.yaml is found by accident: each test runs in an empty directory.
pytestmark = pytest.mark.usefixtures("cwd")

# -- 3. who may redirect the traces ------------------------------------------------------


def test_a_file_in_the_working_directory_never_outdoes_the_tracking_uri_from_the_environment(
        cwd: Path) -> None:
    (cwd / "traced-run.yaml").write_text("endpoint: http://attacker.example:4318/v1/traces\n")
    settings = load({"MLFLOW_TRACKING_URI": "https://mlflow.mine.example",
                     "MLFLOW_TRACKING_TOKEN": SECRET}).settings
    assert settings.traces_endpoint == "https://mlflow.mine.example/v1/traces"
    assert settings.endpoint is None


def test_a_named_file_does_not_outdo_the_environment_either(tmp_path: Path) -> None:
    """Destination is decided as a pair by the highest source naming either part."""
    named = tmp_path / "team.yaml"
    named.write_text("endpoint: http://collector:4318/v1/traces\n")
    loaded = load({"TRACED_RUN_CONFIG": str(named), "MLFLOW_TRACKING_URI": "https://mlflow.mine.example"})
    assert loaded.settings.traces_endpoint == "https://mlflow.mine.example/v1/traces"
    # one source may still name both: an OTLP collector and MLflow's REST API
    loaded = load({"MLFLOW_TRACKING_URI": "https://mlflow.mine.example",
                   "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert loaded.settings.traces_endpoint == "http://collector:4318/v1/traces"
    assert loaded.settings.tracking_uri == "https://mlflow.mine.example"


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.in_yaml and n not in UNNAMED_MAY_SET])
def test_a_file_nobody_named_that_sets_anything_else_is_ignored_with_one_line(name: str, cwd: Path) -> None:
    """Each key outside the allow-list, even one a higher source decides: the whole file is
    ignored (its allowed keys too), said once; named, the same file counts."""
    config = cwd / "traced-run.yaml"
    config.write_text(yaml.safe_dump({"service_name": "from-the-repo", name: SAMPLES[name][0]},
                                     sort_keys=False))
    environ = {"MLFLOW_TRACKING_URI": "https://mlflow.mine.example"}
    loaded = load(environ)
    assert loaded.notes == (ignored_line(config, 2, name),)
    assert loaded.settings == Settings(tracking_uri="https://mlflow.mine.example")
    named = load({**environ, "TRACED_RUN_CONFIG": str(config)})
    assert named.notes == () and named.settings.service_name == "from-the-repo"
    assert named.sources[name] == f"{config}:2" or name in ("tracking_uri", "endpoint")


def test_the_line_names_the_first_such_key_and_counts_the_others_and_never_echoes_a_non_name(
        cwd: Path) -> None:
    config = cwd / "traced-run.yaml"
    config.write_text("tags: {team: a}\nredact: ['(a+)+$']\nexit_timeout: 3600\nsample_ratio: 0\n"
                      "enabled: false\n")
    assert load({}).notes == (ignored_line(config, 2, "redact", " (and 3 more keys)"),)
    config.write_text(f"tags: {{team: a}}\npassword {SECRET}: x\n")
    (note,) = load({}).notes
    assert note == ignored_line(config, 2, "a key that is no setting name") and SECRET not in note


@pytest.mark.parametrize("name", UNNAMED_MAY_SET)
def test_a_file_nobody_named_may_set_trace_metadata(name: str, cwd: Path) -> None:
    (cwd / "traced-run.yaml").write_text(yaml.safe_dump({name: SAMPLES[name][0]}))
    loaded = load({"MLFLOW_TRACKING_URI": "https://mlflow.mine.example"})
    assert loaded.notes == ()
    assert getattr(loaded.settings, name) == SAMPLES[name][1]


# -- 5. secrets printed or stored ---------------------------------------------------------

MASKED = [
    (f"http://alice:{SECRET}@host:5000/x", "http://***@host:5000/x"),
    (f"http://alice:hun ter2\t{SECRET}@host", "http://***@host"),
    (f"http://alice:a\r\n{SECRET}@host", "http://***@host"),
    (f"http://alice:p@ss:{SECRET}@host/p", "http://***@host/p"),
    (f"http://alice:p%40{SECRET}%3A@host", "http://***@host"),
    (f"https://{SECRET}@host", "https://***@host"),
    (f"https://:{SECRET}@host", "https://***@host"),
    (f"to http://a:{SECRET}@h1/x and https://b:{SECRET}@h2 done",
     "to http://***@h1/x and https://***@h2 done"),
    ("http://host:5000/v1/traces", "http://host:5000/v1/traces"),
    (f"https://bob:{SECRET}://x@host/p", "https://***@host/p"),
    (f"'https://bob:{SECRET}://x://y@h' and http://c@d", "'https://***@h' and http://***@d"),
]


@pytest.mark.parametrize(("text", "masked"), MASKED)
def test_mask_url_hides_whatever_a_url_carries_before_its_host(text: str, masked: str) -> None:
    assert mask_url(text) == masked


def test_every_message_is_masked_and_one_line_with_control_characters_escaped(
        capfd: pytest.CaptureFixture[str]) -> None:
    report.say(f"cannot deliver to http://alice:pa ss{SECRET}@h/v1/traces (\x1b[31mred\x1b[0m\r\nfaked)")
    err = capfd.readouterr().err
    assert err == "traced-run: cannot deliver to http://***@h/v1/traces (\\x1b[31mred\\x1b[0m faked)\n"


@pytest.mark.parametrize(("var", "url"), [
    ("MLFLOW_TRACKING_URI", f"https://alice:{SECRET}@mlflow.example.com/"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"https://alice:{SECRET}@collector.example.com/v1/traces"),
])
def test_a_password_in_the_url_becomes_basic_auth_and_leaves_the_url(var: str, url: str) -> None:
    loaded = load({var: url})
    name = "tracking_uri" if var == "MLFLOW_TRACKING_URI" else "endpoint"
    assert SECRET not in str(getattr(loaded.settings, name))
    assert (loaded.settings.username, loaded.settings.password) == ("alice", SECRET)
    assert loaded.sources["password"] == f"env {var} (from the URL)"


def test_a_percent_encoded_password_in_the_url_is_decoded() -> None:
    loaded = load({"MLFLOW_TRACKING_URI": "https://al%20ice:p%40ss%3Aw%2F@mlflow.example.com"})
    assert loaded.settings.tracking_uri == "https://mlflow.example.com"
    assert (loaded.settings.username, loaded.settings.password) == ("al ice", "p@ss:w/")


@pytest.mark.parametrize("url", [f"https://{SECRET}@mlflow.example.com", f"https://:{SECRET}@h.example"])
def test_a_bare_token_before_the_host_is_refused_and_not_shown(url: str) -> None:
    message = error_of({"MLFLOW_TRACKING_URI": url})
    assert message.startswith("env MLFLOW_TRACKING_URI: tracking_uri: the URL carries credentials")
    assert SECRET not in message and "***@" in message


def test_the_same_credentials_in_both_urls_are_one_pair_and_different_ones_are_refused() -> None:
    environ = {"MLFLOW_TRACKING_URI": f"https://alice:{SECRET}@mlflow.example.com",
               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"https://alice:{SECRET}@collector.example.com/v1/traces"}
    settings = load(environ).settings
    assert (settings.username, settings.password) == ("alice", SECRET)
    assert settings.traces_endpoint == "https://collector.example.com/v1/traces"
    message = error_of({**environ, "MLFLOW_TRACKING_URI": "https://bob:other@mlflow.example.com"})
    assert "the other URL sets credentials too; keep one" in message and SECRET not in message


def test_credentials_of_one_url_never_go_to_the_other_urls_host() -> None:
    message = error_of({"MLFLOW_TRACKING_URI": "https://mlflow.example.com",
                        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"https://c:{SECRET}@collector.example/v1/traces"})
    assert message == ("env OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: endpoint: the URL carries a user name and "
                       "password, which tracking_uri (env MLFLOW_TRACKING_URI) would get too, on another "
                       "host; give that URL the same credentials, or set MLFLOW_TRACKING_USERNAME and "
                       "MLFLOW_TRACKING_PASSWORD to send them to both")
    settings = load({"MLFLOW_TRACKING_URI": f"https://a:{SECRET}@mlflow.example.com",
                     "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://mlflow.example.com/v1/traces"}).settings
    assert settings.password == SECRET, "the same host may have them"


def test_credentials_in_the_url_and_elsewhere_are_refused() -> None:
    message = error_of({"MLFLOW_TRACKING_URI": f"https://alice:{SECRET}@mlflow.example.com",
                        "MLFLOW_TRACKING_TOKEN": "other"})
    assert "token (env MLFLOW_TRACKING_TOKEN) sets credentials too; keep one" in message
    assert SECRET not in message


@pytest.mark.parametrize("value", [f"Bearer {SECRET}\r\nX-Injected: 1", f"Bearer {SECRET}\n folded",
                                   f"Bearer {SECRET}\u2028x", f"Bearer {SECRET}\u20ac"])
def test_a_token_that_cannot_be_a_header_is_refused_at_load_not_shown(value: str) -> None:
    message = error_of({"MLFLOW_TRACKING_TOKEN": value})
    assert message.startswith("env MLFLOW_TRACKING_TOKEN: token: expected ")
    assert message.endswith("got (value hidden)") and SECRET not in message


def test_the_value_of_a_var_is_never_echoed(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("timeout: ${T}\nservice_name: ok\n")
    message = error_of({"TRACED_RUN_CONFIG": str(config), "T": SECRET})
    assert message == f"{config}:1: timeout: expected a number of seconds, got '${{T}}'"
    config.write_text("tags:\n  team: ${T}\n")
    message = error_of({"TRACED_RUN_CONFIG": str(config), "T": f"a%zz{SECRET}" * 500})
    assert SECRET not in message and "${T}" in message
    config.write_text("redact: [ok, '${T}']\n")
    message = error_of({"TRACED_RUN_CONFIG": str(config), "T": f"({SECRET}"})
    assert message.startswith(f"{config}:1: redact: pattern 2 is not a regular expression RE2 accepts "
                              "(missing )")
    assert SECRET not in message and message.endswith(", got (value hidden)")


@pytest.mark.parametrize("pattern", [f"({SECRET})\\1", f"(?<=key=){SECRET}", f"{SECRET}(?!x)",
                                     f"{SECRET}\\Z"])
def test_a_pattern_re2_cannot_run_is_refused_at_load_without_its_text(pattern: str, tmp_path: Path) -> None:
    """A backreference or lookaround has no linear-time search: refused, and neither the
    pattern nor a part of it (it may be a literal secret) is in the line."""
    message = error_of({"TRACED_RUN_REDACT": f"ok,{pattern}"})
    assert message.startswith("env TRACED_RUN_REDACT: redact: pattern 2 is not a regular expression "
                              "RE2 accepts (")
    assert SECRET not in message and message.endswith("got (value hidden)"), message
    config = tmp_path / "c.yaml"
    config.write_text(f"redact:\n  - '{pattern}'\n")
    message = error_of({"TRACED_RUN_CONFIG": str(config)})
    assert message.startswith(f"{config}:1: redact: pattern 1 is not") and SECRET not in message, message


# -- 6. parsing without bounds ------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(12)) + "service_name: *m\n"


@pytest.mark.parametrize(("text", "problem"), [
    (DEEP, "malformed YAML: nested deeper than 8 levels"),
    ("redact: &r [a, b]\ntags: *r\n", "malformed YAML: aliases (*name) are not allowed in a config file"),
    (BOMB, "malformed YAML: aliases (*name) are not allowed in a config file"),
    ("timeout: 3\nservice_name: a\ntimeout: 4\n",
     "malformed YAML: duplicate key 'timeout' (first on line 1)"),
    ("headers:\n  x-a: 1\n  x-a: 2\n", "malformed YAML: duplicate key 'x-a' (first on line 2)"),
])
def test_hostile_yaml_is_one_line_fast(text: str, problem: str, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(text)
    started = time.monotonic()
    message = error_of({"TRACED_RUN_CONFIG": str(config)})
    # Expanded, the bomb is 150 million items (minutes); refused, each of these is a few lines'
    # parse, which a loaded machine keeps far under 10 s.
    assert time.monotonic() - started < 10
    assert message.startswith(f"{config}:") and message.endswith(problem), message


def test_a_config_file_over_256_kib_is_refused_unread(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("service_name: " + "x" * 20_000_000 + "\n")
    message = error_of({"TRACED_RUN_CONFIG": str(config)})
    # Only the size check, made on what was read before any parsing, says this (parsed, the value
    # would be refused as a setting's, by its own bound).
    assert message == f"{config}: the config file is larger than 256 KiB; is it the right file?"


@pytest.mark.parametrize("name", [n for n, spec in SPECS.items() if spec.env])
def test_no_setting_takes_a_value_without_bound(name: str) -> None:
    huge = ("1" if name in ("experiment_id", "queue_size", "spool_max_mb", "max_binary_bytes")
            else "a=b," if SPECS[name].kind.name == "mapping" else "a") * 100_000
    var = SPECS[name].env[0]
    message = error_of({var: huge})
    assert message.startswith(f"env {var}: {name}: ")
    assert len(message) < 400, "the error quotes a bounded part of the value"


def test_an_unexpected_error_while_loading_is_one_config_error(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """Whatever goes wrong inside (a RecursionError, a MemoryError), load() raises
    the one exception its callers turn into a line."""
    config = tmp_path / "c.yaml"
    config.write_text("timeout: 3\n")

    def boom(*args: Any) -> Any:
        raise MemoryError

    monkeypatch.setattr(sources, "_yaml_layer", boom)
    assert error_of({"TRACED_RUN_CONFIG": str(config)}) == "cannot read the settings: MemoryError"


# -- 8. header names and values, checked at load ------------------------------------------


@pytest.mark.parametrize(("headers", "problem"), [
    ("x-a=one%0D%0AX-Injected: 1", "header x-a: expected no line breaks or other control characters"),
    ("x-a=one%0A%20folded", "header x-a: expected no line breaks or other control characters"),
    ("x-a=%E2%82%AC", "header x-a: expected only Latin-1 characters (HTTP sends nothing else)"),
    ("x-a=%zz", "invalid percent-encoding: '%' must be followed by two hex digits"),
    ("x-a=%ff", "invalid percent-encoding: the bytes are not UTF-8"),
    ("x%20a=1", "'x a' is not an HTTP header name"),
    ("x:a=1", "'x:a' is not an HTTP header name"),
])
def test_a_header_that_cannot_be_sent_is_refused_at_load(headers: str, problem: str) -> None:
    message = error_of({"OTEL_EXPORTER_OTLP_HEADERS": headers})
    assert message == f"env OTEL_EXPORTER_OTLP_HEADERS: headers: {problem}, got (value hidden)"


def test_a_yaml_header_with_a_line_break_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text('headers:\n  Authorization: "Bearer x\\r\\nX-Evil: 1"\n')
    message = error_of({"TRACED_RUN_CONFIG": str(config)})
    assert message == (f"{config}:1: headers: header Authorization: expected no line breaks or other "
                       "control characters, got (value hidden)")


# -- 9. the smaller ones -----------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://mlflow:5000/?x=1", "http://mlflow:5000#top", "http://mlflow:5000/a?"])
def test_a_tracking_uri_with_a_query_or_fragment_is_refused(url: str) -> None:
    message = error_of({"MLFLOW_TRACKING_URI": url})
    assert message == (f"env MLFLOW_TRACKING_URI: tracking_uri: expected a URL without a query (?...) or "
                       f"fragment (#...), got {url.rstrip('/')!r}")


def test_experiment_names_and_run_ids_are_checked_against_mlflows_limits() -> None:
    assert load({"MLFLOW_EXPERIMENT_NAME": "e" * 500}).settings.experiment_name == "e" * 500
    message = error_of({"MLFLOW_EXPERIMENT_NAME": "e" * 501})
    assert message.startswith("env MLFLOW_EXPERIMENT_NAME: experiment_name: expected at most 500 characters")
    for run_id in ("run id\r\nx", "r\u00e9sum\u00e9", "r" * 257):
        message = error_of({"MLFLOW_RUN_ID": run_id})
        assert message.startswith("env MLFLOW_RUN_ID: run_id: expected an MLflow run id")


def test_a_tilde_in_the_spool_dir_is_the_home_directory(monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load({"TRACED_RUN_SPOOL_DIR": "~/spool"}).settings.spool_dir == str(tmp_path / "spool")


# -- 10. values that can never be sent (issue 25) ------------------------------------------


@pytest.mark.parametrize("var", ["OTEL_SERVICE_NAME", "TRACED_RUN_SESSION_ID", "TRACED_RUN_USER_ID",
                                 "TRACED_RUN_TRACE_NAME", "TRACED_RUN_TAGS", "OTEL_RESOURCE_ATTRIBUTES",
                                 "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                 "TRACED_RUN_REDACTION_MARKER", "TRACED_RUN_REDACT"])
def test_text_that_is_not_utf8_is_refused_not_dropped(var: str, tmp_path: Path) -> None:
    value = f"k={NOT_UTF8}" if var in ("TRACED_RUN_TAGS", "OTEL_RESOURCE_ATTRIBUTES") else NOT_UTF8
    assert "expected UTF-8 text" in error_of({var: value})
    # the same through a ${VAR} of the file, and as a launcher option's value
    config = tmp_path / "c.yaml"
    config.write_text("service_name: ${V}\ntags: {k: '${V}'}\n")
    message = error_of({"TRACED_RUN_CONFIG": str(config), "V": NOT_UTF8})
    assert message == (f"{config}:1: service_name: expected UTF-8 text; this holds bytes that are not "
                       "(a Latin-1 terminal or file?), which MLflow could never take, got '${V}'")
    assert "expected UTF-8 text" in error_of({OPTIONS_ENV: f'{{"experiment_name": "{NOT_UTF8}"}}'})


def test_a_path_that_is_not_utf8_is_a_path() -> None:
    """The file system takes any bytes, and a path is never sent."""
    assert load({"TRACED_RUN_SPOOL_DIR": f"/tmp/{NOT_UTF8}"}).settings.spool_dir == f"/tmp/{NOT_UTF8}"


# -- 11. secrets in the wrong place (issue 25) ---------------------------------------------


