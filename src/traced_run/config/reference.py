"""Renders the settings table as the example config file and as the Markdown
reference, so that neither can drift from the code (tests compare both)."""

from __future__ import annotations

from traced_run.config.settings import FIELDS, SPECS, Spec, default_of
from traced_run.config.sources import shown

HEADER = """\
# traced-run settings. Generated from src/traced_run/config/settings.py: do not edit by hand
# (traced-run config --example > config/traced-run.yaml).
#
# Precedence: launcher options > environment variables > this file > defaults.
# An empty environment variable counts as unset. ${VAR} in a value is replaced
# from the environment, so secrets stay out of this file.
# Found as ./traced-run.yaml without being named (--config, TRACED_RUN_CONFIG), this
# file may set only the keys marked "also from an unnamed file"; with any other key it
# is ignored as a whole, said in one line (see docs/security.md, "Settings and secrets").
# Every key below is commented out at its default: uncomment what you change.
"""


UNNAMED = "Also from an unnamed file (a ./traced-run.yaml nobody named)."
"""Said of each key that ``Spec.unnamed_file`` allows there."""


def _default_yaml(name: str) -> str:
    return shown(name, default_of(name))


def _type(spec: Spec) -> str:
    return f"{spec.kind.name} ({spec.kind.limit})" if spec.kind.limit else spec.kind.name


def _where(spec: Spec) -> str:
    parts = []
    if spec.env:
        parts.append("env " + ", ".join(spec.env))
    if spec.env_off:
        parts.append("off by " + ", ".join(f"{var}=true" for var in spec.env_off))
    if spec.option:
        parts.append("option " + spec.option)
    return "; ".join(parts)


def example_config() -> str:
    """The documented example config: every YAML key, its default, env var and doc."""
    blocks = [HEADER]
    for item in FIELDS:
        spec = SPECS[item.name]
        if not spec.in_yaml:
            continue
        unnamed = f"\n# {UNNAMED}" if spec.unnamed_file else ""
        blocks.append(
            f"\n# {spec.doc}{unnamed}\n# type: {_type(spec)}; {_where(spec)}\n"
            f"# {item.name}: {_default_yaml(item.name)}\n"
        )
    return "".join(blocks)


def markdown_reference() -> str:
    """The settings reference for docs/settings.md."""
    lines = [
        "# Settings reference",
        "",
        "Generated from `src/traced_run/config/settings.py` (`traced-run config --reference`).",
        "Precedence: launcher options > environment variables > YAML file > defaults;",
        "an empty environment variable counts as unset. Secrets are never printed.",
        "A `./traced-run.yaml` found in the working directory, not named by `--config` or",
        "`TRACED_RUN_CONFIG`, may set only the keys marked \"also from an unnamed file\"; with any",
        "other key it is ignored as a whole, said in one line",
        "([Security model](security.md#settings-and-secrets)).",
        "",
        "| YAML key | environment | option | type | default | what it does |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for item in FIELDS:
        spec = SPECS[item.name]
        key = f"`{item.name}`" if spec.in_yaml else "(not in YAML)"
        env = "<br>".join(f"`{var}`" for var in spec.env)
        env += "".join(f"<br>`{var}=true` turns off" for var in spec.env_off)
        option = f"`{spec.option}`" if spec.option else ""
        secret = " Secret: never printed." if spec.secret else ""
        kind = _type(spec).replace("|", "\\|")  # a bare | would end the table cell
        unnamed = f" {UNNAMED}" if spec.unnamed_file else ""
        lines.append(f"| {key} | {env} | {option} | {kind} | `{_default_yaml(item.name)}` "
                     f"| {spec.doc}{secret}{unnamed} |")
    return "\n".join(lines) + "\n"
