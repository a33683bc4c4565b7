"""Which releases of the libraries it drives traced-run works with, and one
clear line for any other.

The ranges are written once, in traced-run's own package metadata
(pyproject.toml), and read back from the installed metadata here: the runtime
dependencies give the OpenTelemetry and OpenInference ranges (pip enforces
them, but a later ``pip install`` can still move a package out of them), the
``pydantic-ai`` extra gives pydantic-ai's (the app brings pydantic-ai itself,
so it is no dependency of ours; ``pip install 'traced-run[pydantic-ai]'``
makes pip enforce it too) and the ``mlflow`` extra gives the MLflow server's.
The compatibility matrix (tests/compat) proves the ends of each range.
"""

from __future__ import annotations

import importlib.metadata
import operator
import re
from collections.abc import Callable, Iterable

DISTRIBUTION = "traced-run"
PYDANTIC_AI = "pydantic-ai-slim"
MLFLOW = "mlflow"
CHECKED = (PYDANTIC_AI, "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http", "opentelemetry-distro",
           "openinference-instrumentation-pydantic-ai")
"""What the app's process runs with; MLflow is a server, checked by the doctor."""

_COMPARE: dict[str, Callable[[tuple[int, ...], tuple[int, ...]], bool]] = {
    ">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt,
    "<": operator.lt}
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)(?:;(.*))?$")
_SPECIFIER = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*([0-9][0-9A-Za-z.]*)\s*$")


class Unsupported(Exception):
    """An installed release outside traced-run's range; ``str()`` is the line to print."""


def numbers(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version: '1.39.0' -> (1, 39, 0), '0.60b0' -> (0, 60)."""
    parts: list[int] = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):
            break
    return tuple(parts)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def ranges(requirements: Iterable[str] | None = None) -> dict[str, str]:
    """Supported range per distribution, e.g. {'pydantic-ai-slim': '>=1.32,<3'}, from
    traced-run's metadata (empty when traced-run is not installed as a distribution)."""
    if requirements is None:
        try:
            requirements = importlib.metadata.requires(DISTRIBUTION) or []
        except importlib.metadata.PackageNotFoundError:
            return {}
    found: dict[str, str] = {}
    for line in requirements:
        match = _REQUIREMENT.match(line)
        if match is None or not match.group(2).strip():
            continue
        name, specifier, marker = _canonical(match.group(1)), match.group(2), match.group(3) or ""
        if name == _canonical(DISTRIBUTION) or ("extra" in marker and name not in (PYDANTIC_AI, MLFLOW)):
            continue
        # Lower bounds first, as pyproject.toml writes them (built metadata may sort them the other way).
        clauses = sorted("".join(specifier.split()).split(","), key=lambda clause: not clause.startswith(">"))
        found.setdefault(name, ",".join(clauses))
    return found


def allows(specifier: str, version: str) -> bool:
    """Whether ``version`` is inside ``specifier`` (comma-joined >=, <, ==, ... clauses),
    compared by release numbers."""
    have = numbers(version)
    for clause in specifier.split(","):
        match = _SPECIFIER.match(clause)
        if match is None:
            continue
        want = numbers(match.group(2))
        width = max(len(have), len(want))
        if not _COMPARE[match.group(1)](have + (0,) * (width - len(have)), want + (0,) * (width - len(want))):
            return False
    return True


def problems(installed: Callable[[str], str | None] | None = None,
             supported: dict[str, str] | None = None) -> list[str]:
    """One sentence per installed distribution outside its range (missing ones are not ours to judge)."""
    version_of = installed or _installed
    supported = ranges() if supported is None else supported
    found = []
    for name in CHECKED:
        specifier = supported.get(name)
        version = version_of(name)
        if specifier and version and not allows(specifier, version):
            found.append(f"{name} {version} is not supported (traced-run supports {name}{specifier}; "
                         f"pip install '{name}{specifier}')")
    return found


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check() -> None:
    """Raise Unsupported, with every problem in one line, when a release is out of range."""
    found = problems()
    if found:
        raise Unsupported("; ".join(found))
