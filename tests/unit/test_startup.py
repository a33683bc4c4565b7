"""The start-up rule, asserted: a traced interpreter that has not imported
pydantic_ai has loaded nothing beyond a bare interpreter's modules but our
``sitecustomize``, ``traced_run``, its ``bootstrap`` and ``flags`` (each
further import at every interpreter start is time every Python process of a
deployment pays). Under the shell launcher the process it becomes also checks
the settings at start-up (the launcher no longer does it in an interpreter of
its own): that adds ``traced_run.startcheck`` and, for plain values, nothing
else.

Here, in process: the check the launched interpreter runs is the settings table's
(startcheck's generated part). tests/test_startup_launched.py starts the interpreters."""

from __future__ import annotations

import json

import pytest

from traced_run import flags, startcheck
from traced_run.config import settings, sources
from traced_run.config.settings import SPECS

# -- the shell launcher's settings check, in the app's own interpreter --------------------


LEAN_KINDS = {id(settings.BOOL): "bool", id(settings.URL): "url", id(settings.PATH): "path",
              id(settings.TEXT): "text", id(settings.USER_NAME): "text", id(settings.PASSWORD): "text",
              id(settings.TOKEN): "text", id(settings.EXPERIMENT_NAME): "text",
              id(settings.EXPERIMENT_ID): "id"}
"""Which plain form each kind of the table gets; a kind not here: none (the full check)."""


def _lean_kind(spec: settings.Spec) -> str:
    # the config file is read by the full check only
    return LEAN_KINDS.get(id(spec.kind), "") if spec.in_yaml else ""


def test_the_launchers_check_reads_the_variables_and_options_of_the_settings_table() -> None:
    env = {var: (name, _lean_kind(spec))
           for name, spec in SPECS.items() for var in (*spec.env, *spec.env_off)}
    assert env == startcheck.ENV, f"regenerate startcheck.ENV: {env!r}"
    assert list(startcheck.ENV) == list(env)
    options = {name: _lean_kind(spec) for name, spec in SPECS.items() if spec.option}
    assert options == startcheck.OPTIONS, f"regenerate startcheck.OPTIONS: {options!r}"
    exclusive: dict[str, list[str]] = {}
    for name, spec in SPECS.items():
        if spec.exclusive and spec.group:
            exclusive.setdefault(spec.group, []).append(name)
    assert tuple(tuple(group) for group in exclusive.values()) == startcheck.EXCLUSIVE
    destination = SPECS["tracking_uri"].group
    assert tuple(name for name, spec in SPECS.items() if spec.group == destination) == startcheck.DESTINATION
    assert startcheck.DEFAULT_CONFIG == sources.DEFAULT_CONFIG


CANDIDATES = [
    "true", "no", " On ", "ture", "1", "0", "-1", "12345678901234567890", "123456789012345678901234567890",
    "http://127.0.0.1:5000", "https://mlflow.example.com/", "http://h:99999", "http://h:", "http://:80",
    "http://u:p@h:5000", "ftp://h", "http://h/?q", "http://h/p#f", "HTTP://h", "http://[::1]:5000",
    "http://h:5000/a b", "http:/h", "http://h_x.y-z~:0/p/a:b", "name", " spaced name ", "a:b", "ab\tc",
    "x" * 199, "x" * 201, "ümlaut", "~/spool", "/tmp/spool", "", "  ", "${VAR}", "%41", "http://h/%zz",
]


def _same_verdict_or_full(environ: dict[str, str]) -> None:
    if startcheck.problem(environ) is None:
        assert startcheck.no_destination(sources.load(environ).settings) is None, environ


@pytest.mark.parametrize("var", list(startcheck.ENV))
def test_the_plain_forms_accept_nothing_the_full_check_refuses(var: str) -> None:
    """The lean check may send a good value to the full check, never let a bad one through."""
    for value in CANDIDATES:
        destination = {} if startcheck.ENV[var][0] in startcheck.DESTINATION else {
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
        _same_verdict_or_full({var: value, **destination})


@pytest.mark.parametrize("name", list(startcheck.OPTIONS))
def test_the_plain_options_accept_nothing_the_full_check_refuses(name: str) -> None:
    for value in [*CANDIDATES, True, False]:
        options = json.dumps({name: value})
        _same_verdict_or_full({flags.OPTIONS_ENV: options})
        _same_verdict_or_full({flags.OPTIONS_ENV: options, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",
                               "MLFLOW_EXPERIMENT_NAME": "agents"})


def test_plain_settings_are_accepted_without_the_full_check() -> None:
    """Not vacuous: the common environment really takes the lean path."""
    environ = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MLFLOW_EXPERIMENT_NAME": "support-bot",
               "TRACED_RUN_SPOOL_DIR": "/var/spool/traced", "OTEL_SERVICE_NAME": "bot"}
    assert startcheck._plainly_valid(environ)
    assert not startcheck._plainly_valid({**environ, "MLFLOW_EXPERIMENT_ID": "1"})
    assert not startcheck._plainly_valid({"MLFLOW_EXPERIMENT_NAME": "x"})
    options = '{"strict": true, "experiment_id": "3", "tracking_uri": "http://mlflow:5000"}'
    assert startcheck._plainly_valid({**environ, flags.OPTIONS_ENV: options})
    assert not startcheck._plainly_valid({**environ, flags.OPTIONS_ENV: '{"experiment_id": "x"}'})
