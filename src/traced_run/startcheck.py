"""The launcher's settings check, run in the app's own interpreter at start-up.

The shell launcher (``scripts/traced-run``) starts no Python of its own: it
marks the process it becomes (``TRACED_RUN_LAUNCHED`` holds its pid) and the
bootstrap calls :func:`problem` before any line of the app runs. The common
case, a handful of environment variables with plain values and no config file,
is accepted here with ``os`` and ``flags`` alone; anything else (a config file,
a mapping, a value outside the plain forms below) goes through the full
``sources.load()``, so no setting is ever accepted that the full check refuses,
and every refusal is the full check's own line.

The plain forms are a strict subset of what the settings table accepts
(tests/test_startup.py checks that), never a second definition of it.
"""

import os

from traced_run import flags

TYPE_CHECKING = False  # typing itself costs more than this whole module
if TYPE_CHECKING:
    from collections.abc import Mapping

    from traced_run.settings import Settings

NO_TRACKING_URI = ("no MLflow tracking URI: set MLFLOW_TRACKING_URI, --tracking-uri or tracking_uri "
                   "in the config file")

# -- generated from the settings table; tests/test_startup.py fails when it drifts ----------
ENV = {
    "TRACED_RUN_CONFIG": "",
    "TRACED_RUN_ENABLED": "bool",
    "OTEL_SDK_DISABLED": "bool",
    "TRACED_RUN_STRICT": "bool",
    "MLFLOW_TRACKING_URI": "url",
    "MLFLOW_EXPERIMENT_ID": "id",
    "MLFLOW_EXPERIMENT_NAME": "text",
    "MLFLOW_RUN_ID": "",
    "MLFLOW_TRACKING_USERNAME": "text",
    "MLFLOW_TRACKING_PASSWORD": "text",
    "MLFLOW_TRACKING_TOKEN": "text",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "url",
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "",
    "OTEL_EXPORTER_OTLP_HEADERS": "",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "",
    "OTEL_EXPORTER_OTLP_TIMEOUT": "",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "",
    "OTEL_EXPORTER_OTLP_COMPRESSION": "",
    "OTEL_SERVICE_NAME": "text",
    "OTEL_RESOURCE_ATTRIBUTES": "",
    "TRACED_RUN_EXIT_TIMEOUT": "",
    "TRACED_RUN_QUEUE_SIZE": "",
    "TRACED_RUN_SPOOL_DIR": "path",
    "TRACED_RUN_SPOOL_MAX_MB": "",
    "TRACED_RUN_INSTRUMENTATION_VERSION": "",
    "TRACED_RUN_INCLUDE_CONTENT": "bool",
    "TRACED_RUN_CAPTURE_CONTENT": "bool",
    "TRACED_RUN_INCLUDE_BINARY_CONTENT": "bool",
    "TRACED_RUN_REDACT": "",
    "TRACED_RUN_REDACT_DEFAULTS": "bool",
    "TRACED_RUN_REDACTION_MARKER": "text",
    "TRACED_RUN_MAX_BINARY_BYTES": "",
    "TRACED_RUN_SESSION_ID": "text",
    "TRACED_RUN_USER_ID": "text",
    "TRACED_RUN_TAGS": "",
    "TRACED_RUN_TRACE_NAME": "text",
    "TRACED_RUN_SAMPLE_RATIO": "",
    "TRACED_RUN_MODE": "",
}
"""Each environment variable the table reads, with the plain form this module
accepts for it; ``""``: none, a value set there takes the full check."""
EXCLUSIVE = (("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"),)
"""Variables of which one source may set only one."""
DESTINATION = ("MLFLOW_TRACKING_URI", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
DEFAULT_CONFIG = "traced-run.yaml"
# -- end of generated part -------------------------------------------------------------------

PLAIN_LENGTH = 200
"""Longest plain value: below every bound of the table (an experiment id's is 64)."""
_URL_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_~/:")


def problem(environ: "Mapping[str, str]") -> "str | None":
    """The one line that refuses the settings of a process with this environment, or None."""
    if _plainly_valid(environ):
        return None
    from traced_run.report import ConfigError
    from traced_run.sources import load

    try:
        loaded = load(environ)
    except ConfigError as error:
        return str(error)
    return no_destination(loaded.settings)


def no_destination(settings: "Settings") -> "str | None":
    """Tracing on and nowhere to send: the launcher refuses to start the command."""
    return NO_TRACKING_URI if settings.enabled and not settings.traces_endpoint else None


def _plainly_valid(environ: "Mapping[str, str]") -> bool:
    if environ.get(flags.OPTIONS_ENV, "").strip() or os.path.isfile(DEFAULT_CONFIG):
        return False
    given = [var for var in ENV if environ.get(var, "").strip()]
    for var in given:
        if not _plain(ENV[var], environ[var]):
            return False
    for group in EXCLUSIVE:
        if sum(var in given for var in group) > 1:
            return False
    return flags.switched_off(environ) or any(var in given for var in DESTINATION)


def _plain(kind: str, value: str) -> bool:
    if kind == "bool":
        try:
            flags.parse_bool(value)
        except ValueError:
            return False
        return True
    if not kind or len(value) > PLAIN_LENGTH or not value.isascii() or not value.isprintable():
        return False
    if kind == "text":
        return ":" not in value
    if kind == "id":
        return len(value.strip()) <= 20 and value.strip().isdigit()
    if kind == "url":
        return _plain_url(value)
    return kind == "path"


def _plain_url(url: str) -> bool:
    """``http(s)://host[:port][/path]`` of letters, digits and ``.-_~/:``: no credentials,
    query, fragment, escapes or IPv6 brackets, which the full check looks at."""
    scheme, separator, rest = url.partition("://")
    host, colon, port = rest.partition("/")[0].partition(":")
    return (scheme in ("http", "https") and bool(separator) and bool(host)
            and (not colon or (port.isdigit() and int(port) <= 65535))
            and all(character in _URL_CHARACTERS for character in rest))
