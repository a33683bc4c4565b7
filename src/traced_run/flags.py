"""The two switches a process must know at interpreter start: the kill switch
and strict mode. Read with ``os`` alone (``json`` only for launcher options in a
form the launchers do not write): the bootstrap asks at every Python start, where importing the settings
machinery would cost more than everything else it does. The settings table
takes its spelling of these variables and of a boolean from here.
"""

# No ``from __future__ import annotations`` and no typing here: either costs
# more at interpreter start than this whole module.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

OPTIONS_ENV = "TRACED_RUN_OPTIONS"
"""The launcher passes its options to the app's processes as JSON in this variable."""
ENABLED_ENV = "TRACED_RUN_ENABLED"
SDK_DISABLED_ENV = "OTEL_SDK_DISABLED"
"""OpenTelemetry's own kill switch: ``true`` turns traced-run off too."""
STRICT_ENV = "TRACED_RUN_STRICT"
LAUNCHED_ENV = "TRACED_RUN_LAUNCHED"
"""The shell launcher puts its pid here before it becomes the command: that process
(and no child of it) checks the settings at start-up, as the launcher would have. The
Python launcher, which checked them itself, puts 0. Either way the first Python that
loads the bootstrap removes it, and one that cannot import traced_run says so."""

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true or false")


def _env(environ: "Mapping[str, str]", name: str) -> bool | None:
    try:
        return parse_bool(environ[name]) if environ.get(name, "").strip() else None
    except ValueError:
        return None


def options(environ: "Mapping[str, str]") -> "dict[str, object] | None":
    """The launcher's options from TRACED_RUN_OPTIONS (``{}`` when there are none), or
    None when it is not a JSON object. What the launchers write, ``{"key": "text",
    "key": true}`` without escapes, is read without importing ``json`` (and ``re``)."""
    raw = environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    plain = _plain_json(raw)
    if plain is not None:
        return plain
    import json

    try:
        given = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return given if isinstance(given, dict) else None


def _plain_json(raw: str) -> "dict[str, object] | None":
    """A flat JSON object of strings without escapes and booleans, as ``json.dumps``
    spells it; None for anything else (then ``json`` reads it)."""
    if not (raw.startswith("{") and raw.endswith("}")) or "\\" in raw:
        return None
    given: dict[str, object] = {}
    body = raw[1:-1].strip()
    for item in body.split(", ") if body else ():
        key, separator, text = item.partition(": ")
        if not (separator and _plain_string(key)) or key[1:-1] in given:
            return None
        if text in ("true", "false"):
            given[key[1:-1]] = text == "true"
        elif _plain_string(text):
            given[key[1:-1]] = text[1:-1]
        else:
            return None
    return given


def _plain_string(text: str) -> bool:
    return len(text) >= 2 and text[0] == text[-1] == '"' and '"' not in text[1:-1]


def _option(environ: "Mapping[str, str]", name: str) -> bool | None:
    given = options(environ)
    value = given.get(name) if given else None
    return value if isinstance(value, bool) else None


def switched_off(environ: "Mapping[str, str]") -> bool:
    """The launcher's ``--disable``, TRACED_RUN_ENABLED=false or OTEL_SDK_DISABLED=true.
    A value that does not parse is left for the settings to report."""
    decided = _option(environ, "enabled")
    if decided is None:
        decided = _env(environ, ENABLED_ENV)
    if decided is None:
        disabled = _env(environ, SDK_DISABLED_ENV)
        decided = None if disabled is None else not disabled
    return decided is False


def strict(environ: "Mapping[str, str]") -> bool:
    """The launcher's ``--strict`` or TRACED_RUN_STRICT=true."""
    decided = _option(environ, "strict")
    return bool(decided if decided is not None else _env(environ, STRICT_ENV))
