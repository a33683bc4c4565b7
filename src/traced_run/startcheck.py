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
(tests/unit/test_startup.py checks that), never a second definition of it.
"""

import os

from traced_run import flags

TYPE_CHECKING = False  # typing itself costs more than this whole module
if TYPE_CHECKING:
    from collections.abc import Mapping

    from traced_run.config.settings import Settings

# -- generated from the settings table; tests/unit/test_startup.py fails when it drifts ----------
ENV = {
    "TRACED_RUN_CONFIG": ("config", ""),
    "TRACED_RUN_ENABLED": ("enabled", "bool"),
    "OTEL_SDK_DISABLED": ("enabled", "bool"),
    "TRACED_RUN_STRICT": ("strict", "bool"),
    "MLFLOW_TRACKING_URI": ("tracking_uri", "url"),
    "MLFLOW_EXPERIMENT_ID": ("experiment_id", "id"),
    "MLFLOW_EXPERIMENT_NAME": ("experiment_name", "text"),
    "MLFLOW_RUN_ID": ("run_id", ""),
    "MLFLOW_ACTIVE_MODEL_ID": ("model_id", ""),
    "TRACED_RUN_AGENT_VERSION": ("agent_version", ""),
    "MLFLOW_WORKSPACE": ("workspace", ""),
    "MLFLOW_TRACKING_USERNAME": ("username", "text"),
    "MLFLOW_TRACKING_PASSWORD": ("password", "text"),
    "MLFLOW_TRACKING_TOKEN": ("token", "text"),
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ("endpoint", "url"),
    "OTEL_EXPORTER_OTLP_TRACES_HEADERS": ("headers", ""),
    "OTEL_EXPORTER_OTLP_HEADERS": ("headers", ""),
    "MLFLOW_TRACKING_SERVER_CERT_PATH": ("ca_bundle", "path"),
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": ("ca_bundle", "path"),
    "OTEL_EXPORTER_OTLP_CERTIFICATE": ("ca_bundle", "path"),
    "REQUESTS_CA_BUNDLE": ("ca_bundle", "path"),
    "MLFLOW_TRACKING_CLIENT_CERT_PATH": ("client_cert", "path"),
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE": ("client_cert", "path"),
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": ("client_cert", "path"),
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY": ("client_key", "path"),
    "OTEL_EXPORTER_OTLP_CLIENT_KEY": ("client_key", "path"),
    "MLFLOW_TRACKING_INSECURE_TLS": ("insecure_tls", "bool"),
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": ("timeout", ""),
    "OTEL_EXPORTER_OTLP_TIMEOUT": ("timeout", ""),
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": ("compression", ""),
    "OTEL_EXPORTER_OTLP_COMPRESSION": ("compression", ""),
    "OTEL_SERVICE_NAME": ("service_name", "text"),
    "OTEL_RESOURCE_ATTRIBUTES": ("resource_attributes", ""),
    "TRACED_RUN_EXIT_TIMEOUT": ("exit_timeout", ""),
    "TRACED_RUN_QUEUE_SIZE": ("queue_size", ""),
    "TRACED_RUN_SPOOL_DIR": ("spool_dir", "path"),
    "TRACED_RUN_SPOOL_MAX_MB": ("spool_max_mb", ""),
    "TRACED_RUN_SPOOL_MAX_AGE": ("spool_max_age", ""),
    "TRACED_RUN_INSTRUMENTATION_VERSION": ("instrumentation_version", ""),
    "TRACED_RUN_INCLUDE_CONTENT": ("include_content", "bool"),
    "TRACED_RUN_CAPTURE_CONTENT": ("include_content", "bool"),
    "TRACED_RUN_INCLUDE_BINARY_CONTENT": ("include_binary_content", "bool"),
    "TRACED_RUN_REDACT": ("redact", ""),
    "TRACED_RUN_REDACT_DEFAULTS": ("redact_defaults", "bool"),
    "TRACED_RUN_REDACTION_MARKER": ("redaction_marker", "text"),
    "TRACED_RUN_MAX_BINARY_BYTES": ("max_binary_bytes", ""),
    "TRACED_RUN_SESSION_ID": ("session_id", "text"),
    "TRACED_RUN_USER_ID": ("user_id", "text"),
    "TRACED_RUN_TAGS": ("tags", ""),
    "TRACED_RUN_TRACE_NAME": ("trace_name", "text"),
    "TRACED_RUN_SAMPLE_RATIO": ("sample_ratio", ""),
    "TRACED_RUN_PROPAGATE_CONTEXT": ("propagate_context", "bool"),
    "TRACED_RUN_MODE": ("mode", ""),
}
"""Each environment variable the table reads: its setting, and the plain form this module
accepts for it (``""``: none, a value set there takes the full check)."""
OPTIONS = {
    "config": "",
    "enabled": "bool",
    "strict": "bool",
    "tracking_uri": "url",
    "experiment_id": "id",
    "experiment_name": "text",
    "run_id": "",
    "service_name": "text",
}
"""The settings a launcher option sets, as TRACED_RUN_OPTIONS names them, and their plain form."""
EXCLUSIVE = (("experiment_id", "experiment_name"),)
"""Settings of which one source may name only one."""
DESTINATION = ("tracking_uri", "endpoint")
DEFAULT_CONFIG = "traced-run.yaml"
# -- end of generated part -------------------------------------------------------------------

PLAIN_LENGTH = 200
"""Longest plain value: below every bound of the table (an experiment id's is 64)."""
_URL_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_~/:")


def problem(environ: "Mapping[str, str]") -> "str | None":
    """The one line that refuses the settings of a process with this environment, or None."""
    if _plainly_valid(environ):
        return None
    from traced_run.config.sources import load
    from traced_run.report import ConfigError

    try:
        loaded = load(environ)
    except ConfigError as error:
        return str(error)
    loaded.say_notes()
    return no_destination(loaded.settings)


def no_destination(settings: "Settings") -> "str | None":
    """Tracing on and nowhere to send: the launcher refuses to start the command."""
    if settings.enabled and not settings.traces_endpoint:
        from traced_run.transport import NO_TRACKING_URI

        return NO_TRACKING_URI
    return None


def _plainly_valid(environ: "Mapping[str, str]") -> bool:
    options = flags.options(environ)
    if options is None or os.path.isfile(DEFAULT_CONFIG):
        return False
    from_env: set[str] = set()
    for var, (name, kind) in ENV.items():
        text = environ.get(var, "")
        if text.strip():
            if not _plain(kind, text):
                return False
            from_env.add(name)
    for name, value in options.items():
        option_kind = OPTIONS.get(name)
        if option_kind == "bool":
            if not isinstance(value, bool):
                return False
        elif option_kind is None or not isinstance(value, str) or not _plain(option_kind, value):
            return False
    for group in EXCLUSIVE:
        if sum(name in from_env for name in group) > 1 or sum(name in options for name in group) > 1:
            return False
    return flags.switched_off(environ) or any(name in from_env or name in options for name in DESTINATION)


def _plain(kind: str, value: str) -> bool:
    if kind == "bool":
        try:
            flags.parse_bool(value)
        except ValueError:
            return False
        return True
    if (not kind or not value.strip() or len(value) > PLAIN_LENGTH or not value.isascii()
            or not value.isprintable()):
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
