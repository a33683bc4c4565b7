"""Reads the settings from their sources and applies precedence.

Precedence: launcher options > environment > YAML file > defaults. An empty
environment variable counts as unset. ``${VAR}`` in a YAML string is replaced
from the environment. Every problem raises :class:`ConfigError` with one line
naming the source (file:line, env var or option), the key and what is wrong;
a secret's value is never part of it.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from traced_run.flags import OPTIONS_ENV
from traced_run.report import ConfigError, mask_url
from traced_run.settings import SPECS, Settings, Spec

DEFAULT_CONFIG = "traced-run.yaml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


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
        pairs = (f"{json.dumps(k)}: {json.dumps('***' if secret else v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(item) for item in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps("***" if secret else mask_url(str(value)))


def _problem(source: str, name: str, spec: Spec, raw: Any, why: str) -> ConfigError:
    what = "(value hidden)" if spec.secret else repr(mask_url(str(raw)))
    return ConfigError(f"{source}: {name}: {why}, got {what}")


def _parse(source: str, name: str, raw: Any, from_yaml: bool) -> Value:
    spec = SPECS[name]
    try:
        value = spec.kind.check_yaml(raw) if from_yaml else spec.kind.parse_text(raw)
    except ValueError as error:
        raise _problem(source, name, spec, raw, str(error)) from None
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
    except ValueError:
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
    return value


def _yaml_layer(path: str, environ: Mapping[str, str]) -> dict[str, Value]:
    import yaml

    try:
        with open(path, "rb") as stream:
            data = stream.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file: {error.strerror or error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ConfigError(f"{path}:{line}: cannot read the config file: not UTF-8 text") from None
    try:
        loader = yaml.SafeLoader(text)
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
            return {}
        if not isinstance(node, yaml.MappingNode):
            line = node.start_mark.line + 1
            raise ConfigError(f"{path}:{line}: expected a mapping of settings at the top level")
        entries = [(k, v, _construct(loader, k, v, path)) for k, v in node.value]
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(f"{where}: malformed YAML: {error.problem or error.context}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: malformed YAML: {error}") from None
    finally:
        loader.dispose()

    keys = [name for name, spec in SPECS.items() if spec.in_yaml]
    layer: dict[str, Value] = {}
    for key_node, value_node, value in entries:
        where = f"{path}:{key_node.start_mark.line + 1}"
        key = str(key_node.value)
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        if value is None:
            continue
        value = _expand_all(value, f"{path}:{value_node.start_mark.line + 1}", key, environ)
        layer[key] = _parse(where, key, value, from_yaml=True)
    return layer


def _construct(loader: Any, key_node: Any, value_node: Any, path: str) -> Any:
    try:
        return loader.construct_object(value_node, deep=True)
    except ValueError as error:
        # PyYAML lets datetime's error through for a date-like value such as 2024-13-45.
        where = f"{path}:{value_node.start_mark.line + 1}"
        raise ConfigError(f"{where}: {key_node.value}: not a valid YAML value: {error}") from None


def _config_path(options: dict[str, Value], env: dict[str, Value]) -> str | None:
    chosen = options.get("config") or env.get("config")
    if chosen is not None:
        path = str(chosen.value)
        if not os.path.isfile(path):
            raise ConfigError(f"{chosen.source}: config: no such file: {path!r}")
        return os.path.abspath(path)
    return os.path.abspath(DEFAULT_CONFIG) if os.path.isfile(DEFAULT_CONFIG) else None


def load(environ: Mapping[str, str] | None = None) -> Loaded:
    """The effective settings for a process with this environment."""
    environ = os.environ if environ is None else environ
    options = _options_layer(environ)
    env = _env_layer(environ)
    path = _config_path(options, env)
    layers = [_yaml_layer(path, environ) if path else {}, env, options]

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
    if path:
        given_path = chosen.get("config")
        chosen["config"] = Value(path, given_path.source if given_path else "found in the working directory")

    values = {name: value.value for name, value in chosen.items()}
    sources = {name: chosen[name].source if name in chosen else "default" for name in SPECS}
    return Loaded(Settings(**values), sources)


def _resolve_groups(layers: list[dict[str, Value]], chosen: dict[str, Value]) -> None:
    """The highest source that names a member of a group decides the whole group;
    a source naming two is wrong even below it, as any wrong value in it is."""
    groups: dict[str, list[str]] = {}
    for name, spec in SPECS.items():
        if spec.exclusive_group:
            groups.setdefault(spec.exclusive_group, []).append(name)
    for members in groups.values():
        decided = False
        for layer in reversed(layers):
            named = [name for name in members if name in layer]
            if len(named) > 1:
                sources = " and ".join(f"{name} ({layer[name].source})" for name in named)
                raise ConfigError(f"both {sources} are set; set only one")
            if named and not decided:
                decided = True
                for other in members:
                    if other not in named:
                        chosen.pop(other, None)
