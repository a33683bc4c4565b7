"""The one table of traced-run's settings.

Each field of :class:`Settings` is a row: its name is the YAML key, its
``spec`` says which environment variables and launcher option set it, how its
text is parsed, and one line of documentation. Parsing and precedence
(``sources``), the example config and the reference (``reference``) and the
``--show-config`` output all read this table; nothing else spells a setting.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from traced_run.flags import ENABLED_ENV, SDK_DISABLED_ENV, STRICT_ENV, parse_bool
from traced_run.report import CONTROL

MAX_TEXT = 1000
"""Characters in a plain string setting (names, ids, the marker)."""
MAX_SECRET = 8192
"""Characters in a password or token."""
MAX_URL = 2048
MAX_PATH = 4096
MAX_PAIRS = 64
"""Entries in a mapping setting (headers, tags, resource attributes)."""
MAX_KEY = 250
"""Characters in a mapping's key: MLflow's limit for a tag key."""
MAX_VALUE = 4096
MAX_PATTERNS = 64
MAX_PATTERN = 1000
MAX_EXPERIMENT_NAME = 500
"""MLflow refuses a longer experiment name."""
_RUN_ID = re.compile(r"[a-zA-Z0-9][\w\-]{0,255}", re.ASCII)
"""MLflow's own check of a run id (mlflow.utils.validation._RUN_ID_REGEX), ASCII
only: the run id is sent as the x-mlflow-run-id header."""
_WORKSPACE = re.compile(r"[a-z0-9][-a-z0-9]{0,61}[a-z0-9]", re.ASCII)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
"""An HTTP field name (RFC 9110 token)."""
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_DIGITS = re.compile(r"[0-9]+")


@dataclass(frozen=True)
class Kind:
    """How a setting's text (env var, option) or YAML value becomes its value."""

    name: str
    """Shown in docs and as the option's metavar: ``bool``, ``url``, ``seconds``..."""
    parse_text: Callable[[str], Any]
    """Parses an env var or option; raises ValueError with what was expected."""
    check_yaml: Callable[[Any], Any]
    """Checks (and converts) a value that YAML already typed."""
    limit: str = ""
    """The bound a value must keep, for the docs: ``at most 1000 characters``."""
    any_bytes: bool = False
    """Takes text that is not UTF-8 (a path: the file system takes any bytes). Nothing else
    does: whatever is sent is UTF-8, and a value that cannot be would lose every batch."""


def require_utf8(value: Any) -> None:
    """Raises ValueError when a string in ``value`` cannot be UTF-8: an environment value
    holds a byte that is not as a lone surrogate (``\\udcff`` for 0xff)."""
    if isinstance(value, Mapping):
        texts = [*value.keys(), *value.values()]
    else:
        texts = value if isinstance(value, list) else [value]
    for text in texts:
        try:
            if isinstance(text, str):
                text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("expected UTF-8 text; this holds bytes that are not (a Latin-1 terminal "
                             "or file?), which MLflow could never take") from None


def _bool_yaml(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return parse_bool(value)
    raise ValueError("expected true or false")


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError("expected a string")
    return str(value)


def _bounded(text: str, maximum: int) -> str:
    if len(text) > maximum:
        raise ValueError(f"expected at most {maximum} characters, not {len(text)}")
    return text


def _one_line(text: str, maximum: int) -> str:
    """Stripped, within ``maximum``, without line breaks or other control characters."""
    text = _bounded(text.strip(), maximum)
    if CONTROL.search(text):
        raise ValueError("expected text without line breaks or other control characters")
    return text


def _text_kind(name: str, check: Callable[[str], str], limit: str) -> Kind:
    return Kind(name, check, lambda value: check(_scalar_text(value)), limit)


def _text(text: str) -> str:
    return _one_line(text, MAX_TEXT)


def _user_name(text: str) -> str:
    name = _one_line(text, MAX_TEXT)
    if ":" in name:
        raise ValueError("a Basic-auth user name cannot hold ':'")
    return name


def _password(text: str) -> str:
    # Sent base64-encoded: any character is safe on the wire; only the length is bounded.
    return _bounded(text.strip(), MAX_SECRET)


def _header_value(text: str) -> str:
    """A value that goes into an HTTP header as it is (a token, an extra header)."""
    text = _bounded(text.strip(), MAX_SECRET)
    if CONTROL.search(text):
        raise ValueError("expected no line breaks or other control characters")
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("expected only Latin-1 characters (HTTP sends nothing else)") from None
    return text


def _url(text: str) -> str:
    url = _bounded(text.strip(), MAX_URL).rstrip("/")
    if CONTROL.search(url) or " " in url:
        raise ValueError("expected a URL without spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("expected an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a non-numeric port
    except ValueError:
        raise ValueError("the URL's port is not a number") from None
    if "?" in url or "#" in url:
        raise ValueError("expected a URL without a query (?...) or fragment (#...)")
    return url


def _path(text: str) -> str:
    path = os.path.expanduser(_bounded(text.strip(), MAX_PATH))
    if "\x00" in path:
        raise ValueError("expected a path without NUL characters")
    return path


def _workspace(text: str) -> str:
    """MLflow's own rule for a workspace name (WorkspaceNameValidator)."""
    name = text.strip()
    if not _WORKSPACE.fullmatch(name) or name in ("workspaces", "api", "ajax-api", "static-files"):
        raise ValueError("expected an MLflow workspace name (2 to 63 of a-z, 0-9 and inner '-', "
                         "not a reserved name)")
    return name


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _duration(text: str) -> float:
    """Seconds, or a number with a unit: ``90s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    text = _bounded(text.strip().lower(), 64)
    unit = _DURATION_UNITS.get(text[-1:], 0)
    try:
        seconds = float(text[:-1] if unit else text) * (unit or 1)
    except ValueError:
        raise ValueError("expected seconds or a number with s, m, h, d or w (e.g. 7d)") from None
    if not 60 <= seconds <= 366 * 86400:
        raise ValueError("expected a duration from 1 minute to 366 days")
    return seconds


def _duration_yaml(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected seconds or a number with s, m, h, d or w (e.g. 7d)")
    return _duration(str(value))


def _experiment_id(text: str) -> str:
    text = _bounded(text.strip(), 64)
    # Not str.isdigit(): it takes full-width and Arabic-Indic digits, which MLflow refuses.
    if not _DIGITS.fullmatch(text):
        raise ValueError("expected a numeric MLflow experiment id (digits 0-9)")
    return text


def _experiment_name(text: str) -> str:
    name = _one_line(text, MAX_EXPERIMENT_NAME)
    if not name:
        raise ValueError("expected a name")
    return name


def _run_id(text: str) -> str:
    text = text.strip()
    if not _RUN_ID.fullmatch(text):
        raise ValueError("expected an MLflow run id (letters, digits, '_' and '-', at most 256)")
    return text


def _agent_version(text: str) -> str:
    name = _one_line(text, MAX_TEXT)
    if not name:
        raise ValueError("expected git, off or a version name")
    if "'" in name:
        # MLflow's search filter quotes the name with ' and has no escape for one inside it.
        raise ValueError("expected a version name without '")
    return name


def _version(text: str) -> int:
    if text.strip() not in ("2", "3", "4", "5", "6"):
        raise ValueError("expected one of 2, 3, 4, 5, 6")
    return int(text)


def _version_yaml(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected one of 2, 3, 4, 5, 6")
    return _version(str(value))


def _count(maximum: int) -> Kind:
    """A whole number from 1 to ``maximum``."""

    def parse(text: str) -> int:
        try:
            count = int(_bounded(text, 32))
        except ValueError:
            raise ValueError("expected a whole number") from None
        if not 1 <= count <= maximum:
            raise ValueError(f"expected a whole number from 1 to {maximum}")
        return count

    def check_yaml(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError("expected a whole number")
        return parse(str(value))

    return Kind("count", parse, check_yaml, f"1 to {maximum}")


def unquote_strict(text: str) -> str:
    """Strict percent-decoding: a stray ``%`` or bytes that are not UTF-8 are errors, not
    replaced with something else than what was meant."""
    from urllib.parse import unquote

    if _BAD_PERCENT.search(text):
        raise ValueError("invalid percent-encoding: '%' must be followed by two hex digits")
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("invalid percent-encoding: the bytes are not UTF-8") from None


def _bounded_pairs(pairs: dict[str, str]) -> dict[str, str]:
    if len(pairs) > MAX_PAIRS:
        raise ValueError(f"expected at most {MAX_PAIRS} entries, not {len(pairs)}")
    for key, value in pairs.items():
        if len(key) > MAX_KEY:
            raise ValueError(f"a name longer than {MAX_KEY} characters")
        if len(value) > MAX_VALUE:
            raise ValueError(f"the value of {key[:40]!r} is longer than {MAX_VALUE} characters")
    return pairs


def _pairs(text: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` with percent-encoding, as OTEL_*_HEADERS and
    OTEL_RESOURCE_ATTRIBUTES spell mappings."""
    pairs: dict[str, str] = {}
    for item in _bounded(text, MAX_PAIRS * (MAX_KEY + MAX_VALUE)).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError("expected key=value pairs separated by commas")
        pairs[unquote_strict(key.strip())] = unquote_strict(value.strip())
    return _bounded_pairs(pairs)


def _pairs_yaml(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping of names to values")
    pairs: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or isinstance(item, (Mapping, list)) or item is None:
            raise ValueError("expected a mapping of names to plain values")
        pairs[key] = str(item).lower() if isinstance(item, bool) else str(item)
    return _bounded_pairs(pairs)


def _headers(pairs: dict[str, str]) -> dict[str, str]:
    """Checked now, so a header cannot fail (or fold) at the first post of a batch."""
    checked: dict[str, str] = {}
    for name, value in pairs.items():
        name = name.strip()
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{_quoted(name)} is not an HTTP header name")
        try:
            checked[name] = _header_value(value)
        except ValueError as error:
            raise ValueError(f"header {name}: {error}") from None
    return checked


def _quoted(name: str) -> str:
    """A name (not a secret) as an error quotes it: short, control characters escaped."""
    return repr(name[:40] + ("..." if len(name) > 40 else ""))


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


_RE2_ERRORS = frozenset((
    "invalid escape sequence", "invalid character class", "invalid character class range", "missing ]",
    "missing )", "unexpected )", "trailing \\", "no argument for repetition operator",
    "invalid repetition size", "bad repetition operator", "invalid perl operator", "invalid UTF-8",
    "invalid named capture group", "pattern too large - compile failed"))
"""RE2's own words for what is wrong with a pattern: the part of its error message an error
line may show. The rest of RE2's message quotes the pattern."""


def redaction_pattern(pattern: str) -> Any:
    """``pattern`` compiled as redaction runs it: by RE2, which searches in time linear in
    the text for every pattern it compiles (and so has no backreferences or lookaround).
    Raises ValueError naming no part of the pattern: a pattern may be a literal secret."""
    import re2

    options = re2.Options()
    options.log_errors = False  # RE2 would write the pattern to stderr
    try:
        return re2.compile(pattern, options)
    except UnicodeEncodeError:  # from an environment variable holding bytes that are not UTF-8
        raise ValueError("text that is not UTF-8") from None
    except re2.error as error:
        said = error.args[0] if error.args else b""
        kind = (said.decode(errors="replace") if isinstance(said, bytes) else str(said)).split(": ", 1)[0]
        raise ValueError(kind if kind in _RE2_ERRORS else "a form RE2 does not take") from None


def _patterns(items: list[str]) -> tuple[str, ...]:
    if len(items) > MAX_PATTERNS:
        raise ValueError(f"expected at most {MAX_PATTERNS} patterns, not {len(items)}")
    for number, item in enumerate(items, 1):
        if len(item) > MAX_PATTERN:
            raise ValueError(f"pattern {number} is longer than {MAX_PATTERN} characters")
        try:
            redaction_pattern(item)
        except ValueError as error:
            # Numbered, not quoted: the pattern may have come from a ${VAR}, never echoed.
            raise ValueError(f"pattern {number} is not a regular expression RE2 accepts ({error}; "
                             f"RE2 has no backreferences, lookaround or \\Z)") from None
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

    return Kind("|".join(choices), parse, lambda value: parse(_scalar_text(value)))


def _number(name: str, expected: str, in_range: Callable[[float], bool], out_of_range: str) -> Kind:
    """A float ``in_range`` accepts; YAML's true and false are not numbers."""

    def parse(text: str) -> float:
        try:
            number = float(_bounded(text, 64))
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
TEXT = _text_kind("string", _text, f"one line, at most {MAX_TEXT} characters")
USER_NAME = _text_kind("string", _user_name, f"one line without ':', at most {MAX_TEXT} characters")
PASSWORD = _text_kind("string", _password, f"at most {MAX_SECRET} characters")
TOKEN = _text_kind("string", _header_value,
                   f"Latin-1 without control characters, at most {MAX_SECRET} characters")
URL = _text_kind("url", _url, f"no query or fragment, at most {MAX_URL} characters")
PATH = dataclasses.replace(_text_kind("path", _path, f"~ expanded, at most {MAX_PATH} characters"),
                           any_bytes=True)
EXPERIMENT_ID = _text_kind("experiment id", _experiment_id, "digits")
EXPERIMENT_NAME = _text_kind("string", _experiment_name,
                             f"one line, at most {MAX_EXPERIMENT_NAME} characters, MLflow's limit")
RUN_ID = _text_kind("run id", _run_id, "MLflow's run id characters")
AGENT_VERSION = _text_kind("string", _agent_version, f"git, off, or a name: one line without ', at most "
                           f"{MAX_TEXT} characters")
WORKSPACE = _text_kind("workspace", _workspace, "MLflow's workspace name rule")
DURATION = Kind("duration", _duration, _duration_yaml, "seconds, or with s, m, h, d, w; 1 minute to 366 days")
SECONDS = _number("seconds", "expected a number of seconds", lambda seconds: 0 < seconds <= 3600,
                  "expected a number of seconds above 0 and at most 3600")
VERSION = Kind("2..6", _version, _version_yaml)
COMPRESSION = _choice("gzip", "deflate", "none")
PAIRS = Kind("mapping", _pairs, _pairs_yaml,
             f"at most {MAX_PAIRS} entries; names up to {MAX_KEY}, values up to {MAX_VALUE} characters")
HEADERS = Kind("mapping", lambda text: _headers(_pairs(text)), lambda value: _headers(_pairs_yaml(value)),
               f"at most {MAX_PAIRS} HTTP headers; Latin-1 values without control characters")
PATTERNS = Kind("list of RE2 regexes", _patterns_text, _patterns_yaml,
                f"at most {MAX_PATTERNS}, each up to {MAX_PATTERN} characters")
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
    """Never printed: shown as ``***`` (mappings: each value; lists: each item)."""
    echoed: bool = True
    """An error may quote a wrong value; not one that may be a secret in the wrong place
    (``bob:password`` as the user name)."""
    in_yaml: bool = True
    group: str | None = None
    """Settings of one group are decided together: the highest source naming any of
    them decides all, and the others' values from lower sources are dropped."""
    exclusive: bool = False
    """One source may name only one setting of the group."""
    unnamed_file: bool = False
    """A ``./traced-run.yaml`` found in the working directory, which nobody named (a cloned
    repository's), may set it: only what cannot redirect traces or credentials, hang, fill
    memory or disk, or silence tracing (trace metadata). Every other key makes such a file
    ignored as a whole."""
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
        PATH, "YAML file to read; default ./traced-run.yaml when it exists (see Security).",
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
        env=("MLFLOW_TRACKING_URI",), option="--tracking-uri", group="destination"))
    experiment_id: str | None = setting(None, Spec(
        EXPERIMENT_ID, "MLflow experiment id; with neither id nor name, experiment 0 (Default).",
        env=("MLFLOW_EXPERIMENT_ID",), option="--experiment-id", group="experiment",
        exclusive=True))
    experiment_name: str | None = setting(None, Spec(
        EXPERIMENT_NAME, "MLflow experiment name, created when missing.",
        env=("MLFLOW_EXPERIMENT_NAME",), option="--experiment-name", group="experiment",
        exclusive=True))
    run_id: str | None = setting(None, Spec(
        RUN_ID, "MLflow run id the traces are linked to.",
        env=("MLFLOW_RUN_ID",), option="--run-id"))
    model_id: str | None = setting(None, Spec(
        RUN_ID, "MLflow LoggedModel id (an agent version) every trace is linked to; wins over "
        "agent_version.", env=("MLFLOW_ACTIVE_MODEL_ID",)))
    agent_version: str = setting("git", Spec(
        AGENT_VERSION, "The agent version (MLflow LoggedModel) traces are linked to. git: the one of the "
        "commit the app runs from (branch, commit, dirty, repository URL), found or created as "
        "mlflow.genai.enable_git_model_versioning() does; off: none; any other text: the one of that name, "
        "found or created.", env=("TRACED_RUN_AGENT_VERSION",)))
    workspace: str | None = setting(None, Spec(
        WORKSPACE, "MLflow workspace (mlflow server --enable-workspaces) of the experiment and its traces; "
        "sent as X-MLFLOW-WORKSPACE with every request. Default: the server's default workspace.",
        env=("MLFLOW_WORKSPACE",)))
    username: str | None = setting(None, Spec(
        USER_NAME, "MLflow basic-auth user name.", env=("MLFLOW_TRACKING_USERNAME",), echoed=False))
    password: str | None = setting(None, Spec(
        PASSWORD, "MLflow basic-auth password; write ${VAR} in YAML, not the password.",
        env=("MLFLOW_TRACKING_PASSWORD",), secret=True))
    token: str | None = setting(None, Spec(
        TOKEN, "MLflow bearer token, used when no user name is set.",
        env=("MLFLOW_TRACKING_TOKEN",), secret=True))
    endpoint: str | None = setting(None, Spec(
        URL, "Full OTLP/HTTP traces URL, e.g. a collector's; default <tracking_uri>/v1/traces.",
        env=("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",), group="destination"))
    headers: dict[str, str] = setting({}, Spec(
        HEADERS, "Extra HTTP headers sent with every export (values are never printed).",
        env=("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"), secret=True,
        merged=True))
    ca_bundle: str | None = setting(None, Spec(
        PATH, "CA certificates (PEM file or directory) that verify an https:// MLflow or endpoint, "
        "instead of the system's; the first variable set wins.",
        env=("MLFLOW_TRACKING_SERVER_CERT_PATH", "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
             "OTEL_EXPORTER_OTLP_CERTIFICATE", "REQUESTS_CA_BUNDLE")))
    client_cert: str | None = setting(None, Spec(
        PATH, "Client certificate (PEM) sent to an https:// server that asks for one; may hold the key too.",
        env=("MLFLOW_TRACKING_CLIENT_CERT_PATH", "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
             "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")))
    client_key: str | None = setting(None, Spec(
        PATH, "Private key (PEM) of client_cert, when that file does not hold it.",
        env=("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY")))
    insecure_tls: bool = setting(False, Spec(
        BOOL, "Do not verify the server's certificate (a development server only): anyone on the way "
        "can read and change traces. Said in one warning line.",
        env=("MLFLOW_TRACKING_INSECURE_TLS",)))
    timeout: float = setting(10.0, Spec(
        SECONDS, "Seconds one export request may take, retries included (as the OTel SDK reads it).",
        env=("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")))
    compression: str = setting("gzip", Spec(
        COMPRESSION, "Request body compression.",
        env=("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION")))
    service_name: str | None = setting(None, Spec(
        TEXT, "service.name of the traces when the app's tracer provider names none; default the script "
        "or module name.",
        env=("OTEL_SERVICE_NAME",), option="--service-name", unnamed_file=True))
    resource_attributes: dict[str, str] = setting({}, Spec(
        PAIRS, "More resource attributes; MLflow shows each as a trace tag.",
        env=("OTEL_RESOURCE_ATTRIBUTES",), merged=True))
    exit_timeout: float = setting(2.0, Spec(
        SECONDS, "Longest a process waits at exit (or SIGTERM) for its spans to be delivered.",
        env=("TRACED_RUN_EXIT_TIMEOUT",)))
    queue_size: int = setting(2048, Spec(
        _count(1_000_000), "Most finished spans held in memory; past half of it, batches go to the spool "
        "instead.",
        env=("TRACED_RUN_QUEUE_SIZE",)))
    spool_dir: str | None = setting(None, Spec(
        PATH, "Where undelivered batches wait for a later send; default ~/.cache/traced-run/spool.",
        env=("TRACED_RUN_SPOOL_DIR",)))
    spool_max_mb: int = setting(256, Spec(
        _count(1_048_576), "Most megabytes the spool holds; past it the oldest batches are removed, "
        "and counted.",
        env=("TRACED_RUN_SPOOL_MAX_MB",)))
    spool_max_age: float = setting(604800.0, Spec(
        DURATION, "Oldest a spooled batch gets; older ones are removed, and counted (default a week).",
        env=("TRACED_RUN_SPOOL_MAX_AGE",)))
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
        "value (a pattern with a group: only the first group). Env: comma-separated. RE2 syntax, run in "
        "linear time: no backreferences or lookaround (refused when the settings load), \\b \\w \\d \\s "
        "are ASCII only (\\pL and \\p{N} are not), $ is \\z unless (?m). A text redaction "
        "cannot screen within its bound is replaced by a note of its length: see docs/security.md, "
        "Redaction.",
        # A pattern may be the secret itself, written out.
        env=("TRACED_RUN_REDACT",), secret=True))
    redact_defaults: bool = setting(True, Spec(
        BOOL, "Also redact common secrets: API keys, bearer tokens, passwords in URLs and key=value.",
        env=("TRACED_RUN_REDACT_DEFAULTS",)))
    redaction_marker: str = setting("[REDACTED]", Spec(
        TEXT, "What a redacted secret is replaced with.", env=("TRACED_RUN_REDACTION_MARKER",)))
    max_binary_bytes: int = setting(65536, Spec(
        _count(64 * 1024 * 1024), "Largest binary message part (image, audio) exported; a larger one is "
        "replaced by its size.", env=("TRACED_RUN_MAX_BINARY_BYTES",)))
    session_id: str | None = setting(None, Spec(
        TEXT, "MLflow trace session of every trace; default pydantic-ai's conversation id.",
        env=("TRACED_RUN_SESSION_ID",), unnamed_file=True))
    user_id: str | None = setting(None, Spec(
        TEXT, "MLflow trace user of every trace.", env=("TRACED_RUN_USER_ID",), unnamed_file=True))
    tags: dict[str, str] = setting({}, Spec(
        PAIRS, "Trace tags set on every trace, e.g. environment, version, git_commit.",
        env=("TRACED_RUN_TAGS",), merged=True, unnamed_file=True))
    trace_name: str | None = setting(None, Spec(
        TEXT, "Name of every trace; default the agent's name.", env=("TRACED_RUN_TRACE_NAME",),
        unnamed_file=True))
    sample_ratio: float = setting(1.0, Spec(
        RATIO, "Share of traces kept, decided by trace id so a trace is kept or dropped whole; "
        "default from OTEL_TRACES_SAMPLER(_ARG) when set, else 1.",
        env=("TRACED_RUN_SAMPLE_RATIO",)))
    propagate_context: bool = setting(True, Spec(
        BOOL, "Inside an agent run, HTTP requests carry the trace (W3C traceparent, and a tracestate entry "
        "telling a traced callee whether it writes to the same MLflow experiment); a callee that does joins "
        "the caller's trace. false: no request carries it (incoming ones are still taken).",
        env=("TRACED_RUN_PROPAGATE_CONTEXT",)))
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
