"""The one table of traced-run's settings.

Each field of :class:`Settings` is a row: its name is the YAML key, its
``spec`` says which environment variables and launcher option set it, how its
text is parsed, and one line of documentation. Parsing and precedence
(``sources``), the example config and the reference (``reference``) and the
``--show-config`` output all read this table; nothing else spells a setting.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from traced_run.flags import ENABLED_ENV, SDK_DISABLED_ENV, STRICT_ENV, parse_bool


@dataclass(frozen=True)
class Kind:
    """How a setting's text (env var, option) or YAML value becomes its value."""

    name: str
    """Shown in docs: ``bool``, ``url``, ``seconds``..."""
    parse_text: Callable[[str], Any]
    """Parses an env var or option; raises ValueError with what was expected."""
    check_yaml: Callable[[Any], Any]
    """Checks (and converts) a value that YAML already typed."""


def _bool_yaml(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return parse_bool(value)
    raise ValueError("expected true or false")


def _text(text: str) -> str:
    return text.strip()


def _text_yaml(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expected a string")
    return str(value).strip()


def _url(text: str) -> str:
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a non-numeric port
    except ValueError:
        raise ValueError("the URL's port is not a number") from None
    return url


def _url_yaml(value: Any) -> str:
    return _url(_text_yaml(value))


def _experiment_id(text: str) -> str:
    text = text.strip()
    if not text.isdigit():
        raise ValueError("expected a numeric MLflow experiment id")
    return text


def _experiment_id_yaml(value: Any) -> str:
    return _experiment_id(_text_yaml(value))


def _version(text: str) -> int:
    if text.strip() not in ("2", "3", "4", "5", "6"):
        raise ValueError("expected one of 2, 3, 4, 5, 6")
    return int(text)


def _version_yaml(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected one of 2, 3, 4, 5, 6")
    return _version(str(value))


def _count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if count < 1:
        raise ValueError("expected a whole number of at least 1")
    return count


def _count_yaml(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("expected a whole number")
    return _count(str(value))


def _pairs(text: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` with percent-encoding, as OTEL_*_HEADERS and
    OTEL_RESOURCE_ATTRIBUTES spell mappings."""
    from urllib.parse import unquote

    pairs: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError("expected key=value pairs separated by commas")
        pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


def _pairs_yaml(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping of names to values")
    pairs: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or isinstance(item, (Mapping, list)) or item is None:
            raise ValueError("expected a mapping of names to plain values")
        pairs[key] = str(item).lower() if isinstance(item, bool) else str(item)
    return pairs


def _split_list(text: str) -> list[str]:
    """Comma-separated items; a comma inside (), [] or {} or after a backslash
    belongs to the item, so regular expressions such as ``\\d{3,5}`` survive."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            depth += (char in "([{") - (char in ")]}")
            current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _patterns(items: list[str]) -> tuple[str, ...]:
    for item in items:
        try:
            re.compile(item)
        except re.error as error:
            raise ValueError(f"{item!r} is not a regular expression ({error})") from None
    return tuple(items)


def _patterns_text(text: str) -> tuple[str, ...]:
    return _patterns(_split_list(text))


def _patterns_yaml(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return _patterns([value])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("expected a list of regular expressions")
    return _patterns(value)


def _choice(*choices: str) -> Kind:
    """One of a few words, any case."""
    expected = f"expected {', '.join(choices[:-1])} or {choices[-1]}"

    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(expected)
        return value

    return Kind("|".join(choices), parse, lambda value: parse(_text_yaml(value)))


def _number(name: str, expected: str, in_range: Callable[[float], bool], out_of_range: str) -> Kind:
    """A float ``in_range`` accepts; YAML's true and false are not numbers."""

    def parse(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            raise ValueError(expected) from None
        if not in_range(number):
            raise ValueError(out_of_range)
        return number

    def check_yaml(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(expected)
        return parse(str(value))

    return Kind(name, parse, check_yaml)


BOOL = Kind("bool", parse_bool, _bool_yaml)
TEXT = Kind("string", _text, _text_yaml)
URL = Kind("url", _url, _url_yaml)
EXPERIMENT_ID = Kind("experiment id", _experiment_id, _experiment_id_yaml)
SECONDS = _number("seconds", "expected a number of seconds", lambda seconds: 0 < seconds <= 3600,
                  "expected a number of seconds above 0 and at most 3600")
VERSION = Kind("2..6", _version, _version_yaml)
COUNT = Kind("count", _count, _count_yaml)
COMPRESSION = _choice("gzip", "deflate", "none")
PAIRS = Kind("mapping", _pairs, _pairs_yaml)
PATTERNS = Kind("list of regexes", _patterns_text, _patterns_yaml)
RATIO = _number("0..1", "expected a number from 0 to 1", lambda ratio: 0 <= ratio <= 1,
                "expected a number from 0 to 1")
MODE = _choice("otlp", "mlflow")


@dataclass(frozen=True)
class Spec:
    """A row of the settings table, less the name and default (the field's)."""

    kind: Kind
    doc: str
    env: tuple[str, ...] = ()
    """Environment variables, highest priority first."""
    env_off: tuple[str, ...] = ()
    """Boolean env vars whose ``true`` means this setting is false (OTEL_SDK_DISABLED)."""
    option: str | None = None
    """The launcher option; a bool setting's option stores ``option_value``."""
    option_value: Any = None
    secret: bool = False
    """Never printed: shown as ``***`` (mappings: each value)."""
    in_yaml: bool = True
    exclusive_group: str | None = None
    """Settings of one group exclude each other; the highest source naming one decides."""
    merged: bool = False
    """Mappings merge key by key across sources instead of the winner replacing all."""


def setting(default: Any, spec: Spec) -> Any:
    kwargs: dict[str, Any] = {"metadata": {"spec": spec}}
    if isinstance(default, dict):
        kwargs["default_factory"] = dict
    else:
        kwargs["default"] = default
    return field(**kwargs)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """traced-run's effective settings, after every source was applied."""

    config: str | None = setting(None, Spec(
        TEXT, "YAML file to read; default ./traced-run.yaml when it exists.",
        env=("TRACED_RUN_CONFIG",), option="--config", in_yaml=False))
    enabled: bool = setting(True, Spec(
        BOOL, "Trace at all. false (or OTEL_SDK_DISABLED=true) loads nothing beyond the bootstrap.",
        env=(ENABLED_ENV,), env_off=(SDK_DISABLED_ENV,), option="--disable",
        option_value=False))
    strict: bool = setting(False, Spec(
        BOOL, "Stop the app (exit 78 or 70) instead of running it untraced when setup fails.",
        env=(STRICT_ENV,), option="--strict", option_value=True))
    tracking_uri: str | None = setting(None, Spec(
        URL, "MLflow tracking server URL; traces go to <tracking_uri>/v1/traces.",
        env=("MLFLOW_TRACKING_URI",), option="--tracking-uri"))
    experiment_id: str | None = setting(None, Spec(
        EXPERIMENT_ID, "MLflow experiment id; with neither id nor name, experiment 0 (Default).",
        env=("MLFLOW_EXPERIMENT_ID",), option="--experiment-id", exclusive_group="experiment"))
    experiment_name: str | None = setting(None, Spec(
        TEXT, "MLflow experiment name, created when missing.",
        env=("MLFLOW_EXPERIMENT_NAME",), option="--experiment-name", exclusive_group="experiment"))
    run_id: str | None = setting(None, Spec(
        TEXT, "MLflow run id the traces are linked to.",
        env=("MLFLOW_RUN_ID",), option="--run-id"))
    username: str | None = setting(None, Spec(
        TEXT, "MLflow basic-auth user name.", env=("MLFLOW_TRACKING_USERNAME",)))
    password: str | None = setting(None, Spec(
        TEXT, "MLflow basic-auth password; write ${VAR} in YAML, not the password.",
        env=("MLFLOW_TRACKING_PASSWORD",), secret=True))
    token: str | None = setting(None, Spec(
        TEXT, "MLflow bearer token, used when no user name is set.",
        env=("MLFLOW_TRACKING_TOKEN",), secret=True))
    endpoint: str | None = setting(None, Spec(
        URL, "Full OTLP/HTTP traces URL, e.g. a collector's; default <tracking_uri>/v1/traces.",
        env=("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",)))
    headers: dict[str, str] = setting({}, Spec(
        PAIRS, "Extra HTTP headers sent with every export (values are never printed).",
        env=("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"), secret=True,
        merged=True))
    timeout: float = setting(10.0, Spec(
        SECONDS, "Seconds one export request may take, retries included (as the OTel SDK reads it).",
        env=("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")))
    compression: str = setting("gzip", Spec(
        COMPRESSION, "Request body compression.",
        env=("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION")))
    service_name: str | None = setting(None, Spec(
        TEXT, "service.name of the traces; default the script or module name.",
        env=("OTEL_SERVICE_NAME",), option="--service-name"))
    resource_attributes: dict[str, str] = setting({}, Spec(
        PAIRS, "More resource attributes; MLflow shows each as a trace tag.",
        env=("OTEL_RESOURCE_ATTRIBUTES",), merged=True))
    exit_timeout: float = setting(2.0, Spec(
        SECONDS, "Longest a process waits at exit (or SIGTERM) for its spans to be delivered.",
        env=("TRACED_RUN_EXIT_TIMEOUT",)))
    queue_size: int = setting(2048, Spec(
        COUNT, "Most finished spans held in memory; past half of it, batches go to the spool instead.",
        env=("TRACED_RUN_QUEUE_SIZE",)))
    spool_dir: str | None = setting(None, Spec(
        TEXT, "Where undelivered batches wait for a later send; default ~/.cache/traced-run/spool.",
        env=("TRACED_RUN_SPOOL_DIR",)))
    spool_max_mb: int = setting(256, Spec(
        COUNT, "Most megabytes the spool holds; past it the oldest batches are removed, and counted.",
        env=("TRACED_RUN_SPOOL_MAX_MB",)))
    instrumentation_version: int | None = setting(None, Spec(
        VERSION, "pydantic-ai instrumentation format version; default pydantic-ai's own.",
        env=("TRACED_RUN_INSTRUMENTATION_VERSION",)))
    include_content: bool = setting(True, Spec(
        BOOL, "Export prompts, messages, tool arguments and results; false: none of their text "
        "leaves the process.",
        env=("TRACED_RUN_INCLUDE_CONTENT", "TRACED_RUN_CAPTURE_CONTENT")))
    include_binary_content: bool = setting(True, Spec(
        BOOL, "Record binary content (images, audio) of messages.",
        env=("TRACED_RUN_INCLUDE_BINARY_CONTENT",)))

    redact: tuple[str, ...] = setting((), Spec(
        PATTERNS, "More regular expressions whose matches are replaced in every exported attribute "
        "value (a pattern with a group: only the first group). Env: comma-separated.",
        env=("TRACED_RUN_REDACT",)))
    redact_defaults: bool = setting(True, Spec(
        BOOL, "Also redact common secrets: API keys, bearer tokens, passwords in URLs and key=value.",
        env=("TRACED_RUN_REDACT_DEFAULTS",)))
    redaction_marker: str = setting("[REDACTED]", Spec(
        TEXT, "What a redacted secret is replaced with.", env=("TRACED_RUN_REDACTION_MARKER",)))
    max_binary_bytes: int = setting(65536, Spec(
        COUNT, "Largest binary message part (image, audio) exported; a larger one is replaced by "
        "its size.", env=("TRACED_RUN_MAX_BINARY_BYTES",)))
    session_id: str | None = setting(None, Spec(
        TEXT, "MLflow trace session of every trace; default pydantic-ai's conversation id.",
        env=("TRACED_RUN_SESSION_ID",)))
    user_id: str | None = setting(None, Spec(
        TEXT, "MLflow trace user of every trace.", env=("TRACED_RUN_USER_ID",)))
    tags: dict[str, str] = setting({}, Spec(
        PAIRS, "Trace tags set on every trace, e.g. environment, version, git_commit.",
        env=("TRACED_RUN_TAGS",), merged=True))
    trace_name: str | None = setting(None, Spec(
        TEXT, "Name of every trace; default the agent's name.", env=("TRACED_RUN_TRACE_NAME",)))
    sample_ratio: float = setting(1.0, Spec(
        RATIO, "Share of traces kept, decided by trace id so a trace is kept or dropped whole; "
        "default from OTEL_TRACES_SAMPLER(_ARG) when set, else 1.",
        env=("TRACED_RUN_SAMPLE_RATIO",)))
    mode: str = setting("otlp", Spec(
        MODE, "otlp: our pipeline over OTLP/HTTP; mlflow: MLflow's own mlflow.pydantic_ai.autolog() "
        "(needs the mlflow package in the app).", env=("TRACED_RUN_MODE",)))

    @property
    def traces_endpoint(self) -> str | None:
        """Where spans are sent: the explicit endpoint, else MLflow's OTLP route."""
        if self.endpoint:
            return self.endpoint
        return f"{self.tracking_uri}/v1/traces" if self.tracking_uri else None


FIELDS: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(Settings)
SPECS: dict[str, Spec] = {f.name: f.metadata["spec"] for f in FIELDS}


def default_of(name: str) -> Any:
    """The default a field declares (mappings: an empty dict)."""
    (found,) = (f for f in FIELDS if f.name == name)
    return {} if found.default is dataclasses.MISSING else found.default
