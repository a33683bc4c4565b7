"""Reads the settings from their sources and applies precedence.

Precedence: launcher options > environment > YAML file > defaults. An empty
environment variable counts as unset. ``${VAR}`` in a YAML string is replaced
from the environment. Every problem raises :class:`ConfigError` with one line
naming the source (file:line, env var or option), the key and what is wrong;
a secret's value, and the value of a ``${VAR}``, is never part of it.

Hostile input is bounded: the file's size, the YAML's nesting, no aliases (a
few hundred bytes of them expand to gigabytes), no duplicate keys, and every
value's length (the settings table). A ``./traced-run.yaml`` nobody named may
not choose where traces and credentials go nor weaken privacy (``Spec.trust``).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from traced_run.config.settings import SPECS, Settings, Spec, unquote_strict
from traced_run.flags import OPTIONS_ENV
from traced_run.report import ConfigError, mask_url

DEFAULT_CONFIG = "traced-run.yaml"
MAX_CONFIG_BYTES = 256 * 1024
"""A config file is a few dozen lines; a larger one is refused, not parsed."""
MAX_DEPTH = 8
"""YAML nesting: settings need two levels (a mapping of headers); deeper is refused
before PyYAML's recursive composer could exhaust the stack."""
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME_LIKE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,39}")


@dataclass(frozen=True)
class Value:
    """A setting's value as one source gave it."""

    value: Any
    source: str
    """``default``, ``file.yaml:12``, ``env MLFLOW_TRACKING_URI`` or ``option --config``."""


@dataclass(frozen=True)
class Loaded:
    """Effective settings and, for each, the source that decided it."""

    settings: Settings
    sources: dict[str, str]


def shown(name: str, value: Any) -> str:
    """A value as YAML, as ``traced-run config`` and the example config print
    it: secrets (and a URL's password) masked."""
    secret = SPECS[name].secret
    if isinstance(value, dict):
        pairs = (f"{json.dumps(mask_url(k))}: {json.dumps('***' if secret else mask_url(v))}"
                 for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps("***" if secret else mask_url(item)) for item in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps("***" if secret else mask_url(str(value)))


SHOWN_VALUE = 80
"""Characters of a wrong value an error quotes; the rest is cut."""


def _problem(source: str, name: str, spec: Spec, raw: Any, why: str) -> ConfigError:
    if spec.secret:
        what = "(value hidden)"
    else:
        text = mask_url(str(raw))
        if "@" in text and "://" not in text:
            # A wrong value that is almost a URL ("http:/user:pw@host"): what precedes
            # the "@" would be credentials in one.
            text = "***@" + text.rpartition("@")[2]
        what = repr(text[:SHOWN_VALUE] + "..." if len(text) > SHOWN_VALUE else text)
    return ConfigError(f"{source}: {name}: {why}, got {what}")


def _parse(source: str, name: str, raw: Any, from_yaml: bool, written: Any = None) -> Value:
    """``written``: the value as the file spells it, ``${VAR}`` not replaced; an error
    quotes that, never what a variable holds."""
    spec = SPECS[name]
    try:
        value = spec.kind.check_yaml(raw) if from_yaml else spec.kind.parse_text(raw)
    except ValueError as error:
        raise _problem(source, name, spec, raw if written is None else written, str(error)) from None
    return Value(value, source)


def _env_value(name: str, environ: Mapping[str, str]) -> Value | None:
    spec = SPECS[name]
    for var in spec.env:
        if environ.get(var, "").strip():
            return _parse(f"env {var}", name, environ[var], from_yaml=False)
    for var in spec.env_off:
        if environ.get(var, "").strip():
            off = _parse(f"env {var}", name, environ[var], from_yaml=False)
            return Value(False, off.source) if off.value else None
    return None


def _env_layer(environ: Mapping[str, str]) -> dict[str, Value]:
    return {name: value for name in SPECS if (value := _env_value(name, environ)) is not None}


def _options_layer(environ: Mapping[str, str]) -> dict[str, Value]:
    raw = environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        given = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        raise ConfigError(f"env {OPTIONS_ENV}: not the JSON the launcher writes") from None
    if not isinstance(given, dict):
        raise ConfigError(f"env {OPTIONS_ENV}: not the JSON the launcher writes")
    layer: dict[str, Value] = {}
    for name, value in given.items():
        spec = SPECS.get(name)
        if spec is None or spec.option is None:
            raise ConfigError(f"env {OPTIONS_ENV}: unknown setting {name!r}")
        layer[name] = _parse(f"option {spec.option}", name, value, from_yaml=True)
    return layer


def _expand(text: str, where: str, name: str, environ: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        var = match.group(1)
        if not environ.get(var, ""):
            raise ConfigError(f"{where}: {name}: ${{{var}}} is not set in the environment")
        return environ[var]

    return _VAR.sub(one, text)


def _expand_all(value: Any, where: str, name: str, environ: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return _expand(value, where, name, environ)
    if isinstance(value, dict):
        return {k: _expand_all(v, where, name, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_all(item, where, name, environ) for item in value]
    return value


def _yaml_layer(path: str, environ: Mapping[str, str]) -> dict[str, Value]:
    keys = [name for name, spec in SPECS.items() if spec.in_yaml]
    layer: dict[str, Value] = {}
    for key_node, value_node, value in _yaml_entries(path, _config_text(path)):
        where = f"{path}:{key_node.start_mark.line + 1}"
        key = str(key_node.value)
        if key not in keys:
            if not _NAME_LIKE.fullmatch(key):
                # A key that is no name is most often a line whose ': ' went missing, and
                # the rest of such a line may be a password: it is not echoed.
                raise ConfigError(f"{where}: unknown key (not a setting name; is a ': ' missing "
                                  "or misplaced on that line?)")
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        if value is None:
            continue
        expanded = _expand_all(value, f"{path}:{value_node.start_mark.line + 1}", key, environ)
        layer[key] = _parse(where, key, expanded, from_yaml=True, written=value)
    return layer


def _config_text(path: str) -> str:
    """The config file's text, read within MAX_CONFIG_BYTES."""
    try:
        with open(path, "rb") as stream:
            data = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file: {error.strerror or error}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: the config file is larger than {MAX_CONFIG_BYTES // 1024} KiB; "
                          "is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{path}:{line}: cannot read the config file: not UTF-8 text") from None


def _yaml_entries(path: str, text: str) -> list[tuple[Any, Any, Any]]:
    """The top-level mapping's (key node, value node, value) triples; a YAML
    error becomes a ConfigError with its place."""
    import yaml

    try:
        loader = _bounded_loader(yaml)(text)
    except yaml.reader.ReaderError as error:
        # Raised while the text is checked, before YAML has a mark: count the place out.
        line = text.count("\n", 0, error.position) + 1
        column = error.position - text.rfind("\n", 0, error.position)
        raise ConfigError(f"{path}:{line}:{column}: malformed YAML: character #x{error.character:04x} "
                          f"is not allowed") from None
    try:
        node = loader.get_single_node()
        # No document, or an empty one ("---" above commented-out keys): nothing set.
        if node is None or node.tag == "tag:yaml.org,2002:null":
            return []
        if not isinstance(node, yaml.MappingNode):
            line = node.start_mark.line + 1
            raise ConfigError(f"{path}:{line}: expected a mapping of settings at the top level")
        return [(k, v, _construct(loader, k, v, path)) for k, v in node.value]
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(f"{where}: malformed YAML: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: malformed YAML: {error}") from None
    finally:
        loader.dispose()


def _bounded_loader(yaml: Any) -> Any:
    """PyYAML's safe loader that refuses aliases, nesting deeper than MAX_DEPTH and a
    key given twice in one mapping, each with the place it happened."""

    class Loader(yaml.SafeLoader):  # type: ignore[misc]
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed in a config file", event.start_mark)
            if self.depth >= MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def compose_mapping_node(self, anchor: Any) -> Any:
            node = super().compose_mapping_node(anchor)
            first: dict[Any, Any] = {}
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in first:
                        raise yaml.composer.ComposerError(
                            None, None, f"duplicate key {key.value[:40]!r} (first on line "
                            f"{first[key.value].line + 1})", key.start_mark)
                    first[key.value] = key.start_mark
            return node

    return Loader


def _construct(loader: Any, key_node: Any, value_node: Any, path: str) -> Any:
    try:
        return loader.construct_object(value_node, deep=True)
    except ValueError as error:
        # PyYAML lets datetime's error through for a date-like value such as 2024-13-45.
        where = f"{path}:{value_node.start_mark.line + 1}"
        raise ConfigError(f"{where}: {key_node.value}: not a valid YAML value: {error}") from None


def _config_path(options: dict[str, Value], env: dict[str, Value]) -> tuple[str | None, bool]:
    """The config file to read, and whether someone named it (an option or the
    environment) rather than it merely being in the working directory."""
    chosen = options.get("config") or env.get("config")
    if chosen is not None:
        path = str(chosen.value)
        if not os.path.isfile(path):
            raise ConfigError(f"{chosen.source}: config: no such file: {mask_url(path)[:SHOWN_VALUE]!r}")
        return os.path.abspath(path), True
    return (os.path.abspath(DEFAULT_CONFIG), False) if os.path.isfile(DEFAULT_CONFIG) else (None, False)


def load(environ: Mapping[str, str] | None = None) -> Loaded:
    """The effective settings for a process with this environment.

    Never raises anything but ConfigError: under the env-only set-up this runs
    inside the app's ``import pydantic_ai``, where any other exception (a
    RecursionError, a MemoryError) would reach the app."""
    environ = os.environ if environ is None else environ
    try:
        return _load(environ)
    except ConfigError:
        raise
    except Exception as error:  # the app must not pay for a bug of ours: one line, untraced
        raise ConfigError(f"cannot read the settings: {type(error).__name__}") from None


def _load(environ: Mapping[str, str]) -> Loaded:
    options = _options_layer(environ)
    env = _env_layer(environ)
    path, named = _config_path(options, env)
    from_file = _yaml_layer(path, environ) if path else {}
    layers = [from_file, env, options]

    chosen: dict[str, Value] = {}
    for name, spec in SPECS.items():
        given = [layer[name] for layer in layers if name in layer]
        if spec.merged and given:
            merged: dict[str, str] = {}
            for value in given:
                merged.update(value.value)
            chosen[name] = Value(merged, " + ".join(v.source for v in given))
        elif given:
            chosen[name] = given[-1]
    _resolve_groups(layers, chosen)
    if path and not named:
        _refuse_what_an_unnamed_file_may_not_set(from_file, chosen)
    _move_url_credentials(chosen)
    if path:
        given_path = chosen.get("config")
        chosen["config"] = Value(path, given_path.source if given_path else "found in the working directory")

    values = {name: value.value for name, value in chosen.items()}
    sources = {name: chosen[name].source if name in chosen else "default" for name in SPECS}
    return Loaded(Settings(**values), sources)


def _refuse_what_an_unnamed_file_may_not_set(from_file: dict[str, Value], chosen: dict[str, Value]) -> None:
    """A ``./traced-run.yaml`` nobody named (a cloned repository's) may not decide
    where traces and credentials go nor weaken privacy; named, it may."""
    for name, given in from_file.items():
        trust = SPECS[name].trust
        decides = chosen.get(name) is given or (SPECS[name].merged and name in chosen)
        if trust is not None and decides and trust.refuses(given.value):
            raise ConfigError(
                f"{given.source}: {name}: a traced-run.yaml found in the working directory may not "
                f"{trust.what}; name the file (--config FILE or TRACED_RUN_CONFIG=FILE) if you trust it")


def _move_url_credentials(chosen: dict[str, Value]) -> None:
    """``https://user:password@host`` becomes the URL without them plus username and
    password: urllib would send neither, and a URL is printed and stored where a
    password must not be. Anything else before "@" (a bare token) is refused, and so
    are credentials of one URL when the other names another host, which would get
    them too (username and password go with every request)."""
    from urllib.parse import urlsplit, urlunsplit

    found: tuple[str, str] | None = None
    carried: list[str] = []
    for name in ("tracking_uri", "endpoint"):
        given = chosen.get(name)
        if given is None:
            continue
        parts = urlsplit(given.value)
        if "@" not in parts.netloc:
            continue
        userinfo, _, host = parts.netloc.rpartition("@")
        user, colon, password = userinfo.partition(":")
        shown_url = mask_url(given.value)
        if not colon or not user:
            raise ConfigError(f"{given.source}: {name}: the URL carries credentials before '@' that are "
                              "not user:password; set MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME "
                              f"and MLFLOW_TRACKING_PASSWORD) instead, got {shown_url!r}")
        try:
            pair = (SPECS["username"].kind.parse_text(unquote_strict(user)),
                    SPECS["password"].kind.parse_text(unquote_strict(password)))
        except ValueError as error:
            raise ConfigError(f"{given.source}: {name}: the user name or password in the URL: {error}, "
                              f"got {shown_url!r}") from None
        others = [f"{other} ({chosen[other].source})" for other in ("username", "password", "token")
                  if other in chosen and not chosen[other].source.endswith(" (from the URL)")]
        if others or (found is not None and found != pair):
            also = ", ".join(others) if others else "the other URL"
            raise ConfigError(f"{given.source}: {name}: the URL carries a user name and password, and "
                              f"{also} sets credentials too; keep one, got {shown_url!r}")
        found = pair
        carried.append(name)
        chosen[name] = Value(urlunsplit(parts._replace(netloc=host)), given.source)
        chosen["username"] = Value(pair[0], f"{given.source} (from the URL)")
        chosen["password"] = Value(pair[1], f"{given.source} (from the URL)")
    if len(carried) == 1 and "tracking_uri" in chosen and "endpoint" in chosen:
        (name,) = carried
        other = "endpoint" if name == "tracking_uri" else "tracking_uri"
        if urlsplit(chosen[name].value).netloc != urlsplit(chosen[other].value).netloc:
            raise ConfigError(f"{chosen[name].source}: {name}: the URL carries a user name and password, "
                              f"which {other} ({chosen[other].source}) would get too, on another host; "
                              "give that URL the same credentials, or set MLFLOW_TRACKING_USERNAME and "
                              "MLFLOW_TRACKING_PASSWORD to send them to both")


def _resolve_groups(layers: list[dict[str, Value]], chosen: dict[str, Value]) -> None:
    """The highest source that names a member of a group decides the whole group
    (so a file's endpoint never outdoes MLFLOW_TRACKING_URI from the environment); in
    an exclusive group a source naming two is wrong even below it, as any wrong
    value in it is."""
    groups: dict[str, list[str]] = {}
    for name, spec in SPECS.items():
        if spec.group:
            groups.setdefault(spec.group, []).append(name)
    for members in groups.values():
        decided = False
        for layer in reversed(layers):
            named = [name for name in members if name in layer]
            if len(named) > 1 and SPECS[named[0]].exclusive:
                sources = " and ".join(f"{name} ({layer[name].source})" for name in named)
                raise ConfigError(f"both {sources} are set; set only one")
            if named and not decided:
                decided = True
                for other in members:
                    if other not in named:
                        chosen.pop(other, None)
