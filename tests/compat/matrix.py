"""The compatibility matrix's definition: which releases each cell installs,
which MLflow server it talks to and what it must show. ``cells.py`` runs it;
the table in docs/supported-versions.md is generated from it
(``python tests/compat/matrix.py`` prints it; tests/unit/test_compat.py
fails when the page differs).

Not a cross product: each axis's ends are covered by some cell, every cell
by a fresh venv. The supported ranges themselves are read from pyproject.toml
(the one place they are written).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

OTEL_FLOOR = ("opentelemetry-api==1.39.0", "opentelemetry-sdk==1.39.0",
              "opentelemetry-exporter-otlp-proto-http==1.39.0", "opentelemetry-distro==0.60b0")
OTEL_NEWEST = ("opentelemetry-api==1.45.2", "opentelemetry-sdk==1.45.2",
               "opentelemetry-exporter-otlp-proto-http==1.45.2")
OPENINFERENCE = "openinference-instrumentation-pydantic-ai==0.1.30"
"""Its declared floor is also its newest release (November 2026)."""


@dataclass(frozen=True)
class Server:
    version: str
    gzip: bool
    """Whether it reads gzip/deflate bodies (MLflow >= 3.7); the doctor must say the same."""
    conversation_as_text: bool = False
    """It keeps an LLM span's conversation (``mlflow.spanInputs``) as the JSON text
    traced-run sent, not as a list: its OTLP receiver does not decode that attribute."""
    session: bool = True
    """Its OTLP receiver turns ``session.id`` into the trace's ``mlflow.trace.session``."""
    links: bool = True
    """Its StartTraceV3 merges a trace's links (agent version, run) into a trace stored from OTLP
    (MLflow >= 3.13); older ones are told so and left unlinked."""
    extra: tuple[str, ...] = ()
    """What else its venv pins to start at all."""
    dependencies_of: str = ""
    """Install this release's dependencies, then this server's own wheel without its
    dependencies: for a release whose pinned companions are not on PyPI."""

    @property
    def installs(self) -> tuple[tuple[str, ...], ...]:
        """The pip install steps of its venv."""
        if self.dependencies_of:
            return ((f"mlflow=={self.dependencies_of}", *self.extra),
                    ("--no-deps", f"mlflow=={self.version}"))
        return ((f"mlflow=={self.version}", *self.extra),)


SERVERS = {s.version: s for s in (
    # 3.6 and 3.7 import a name SQLAlchemy 2.1 removed.
    Server("3.6.0", gzip=False, conversation_as_text=True, session=False, links=False,
           extra=("sqlalchemy<2.1",)),
    Server("3.7.0", gzip=True, conversation_as_text=True, session=False, links=False,
           extra=("sqlalchemy<2.1",)),
    Server("3.17.2", gzip=True),
    # mlflow 3.18.0 pins mlflow-skinny==3.18.0 and mlflow-tracing==3.18.0, which PyPI does
    # not have (November 2026): pip cannot install it as published. Its wheel carries the
    # whole `mlflow` package (server included), laid over 3.17.2's dependencies.
    Server("3.18.0", gzip=True, dependencies_of="3.17.2"),
)}


@dataclass(frozen=True)
class Cell:
    name: str
    python: str
    pydantic_ai: str
    otel: tuple[str, ...]
    server: str
    supported: bool = True
    """False: a release below a floor, where traced-run must refuse in one line."""

    @property
    def requirements(self) -> tuple[str, ...]:
        return (f"pydantic-ai-slim=={self.pydantic_ai}", *self.otel, OPENINFERENCE)

    @property
    def otel_label(self) -> str:
        return "floor" if self.otel == OTEL_FLOOR else "newest"


CELLS = (
    Cell("floor", "3.10", "1.32.0", OTEL_FLOOR, "3.6.0"),
    Cell("middle", "3.11", "2.0.0", OTEL_FLOOR, "3.7.0"),
    Cell("newest-py312", "3.12", "2.68.0", OTEL_NEWEST, "3.17.2"),
    Cell("newest-py313", "3.13", "2.68.0", OTEL_NEWEST, "3.18.0"),
    Cell("below-floor", "3.11", "1.31.0", OTEL_FLOOR, "3.18.0", supported=False),
)


def pinned(requirements: tuple[str, ...], name: str) -> str:
    return next(r.split("==")[1] for r in requirements if r.split("==")[0] == name)


def supported_ranges() -> dict[str, str]:
    """Range per distribution as pyproject.toml declares it (tomllib: run with Python >= 3.11)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *project["optional-dependencies"]["pydantic-ai"],
             *project["optional-dependencies"]["mlflow"]]
    found = {"python": project["requires-python"]}
    for line in lines:
        name, _, specifier = line.partition(">")
        found[name] = ">" + specifier
    return found


def _versions(values: list[str]) -> str:
    unique = sorted(set(values), key=lambda v: [int(p) if p.isdigit() else p for p in
                                                 v.replace("b", ".b.").split(".")])
    return ", ".join(unique)


def _inputs(server: Server) -> str:
    return "conversation as JSON text" if server.conversation_as_text else "conversation"


def table() -> str:
    """docs/supported-versions.md's table: ranges and the releases the matrix runs."""
    ranges = supported_ranges()
    good = [c for c in CELLS if c.supported]
    rows = [
        ("Python", ranges["python"], _versions([c.python for c in good])),
        ("pydantic-ai (`pydantic-ai-slim`)", ranges["pydantic-ai-slim"],
         _versions([c.pydantic_ai for c in good])),
        ("OpenTelemetry SDK and OTLP/HTTP exporter", ranges["opentelemetry-sdk"],
         _versions([pinned(c.otel, "opentelemetry-sdk") for c in good])),
        ("OpenInference pydantic-ai processor", ranges["openinference-instrumentation-pydantic-ai"],
         pinned((OPENINFERENCE,), "openinference-instrumentation-pydantic-ai")),
        ("MLflow server", ranges["mlflow"], _versions([c.server for c in good])),
    ]
    lines = ["| | supported | run by the matrix |", "|---|---|---|"]
    lines += [f"| {what} | `{spec}` | {tested} |" for what, spec, tested in rows]
    lines += ["", "| cell | Python | pydantic-ai | OpenTelemetry | MLflow server | gzip bodies "
              "| LLM span inputs | trace session | expected |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in CELLS:
        server = SERVERS[cell.server]
        expected = "traces" if cell.supported else "one `traced-run:` line, untraced"
        lines.append(f"| {cell.name} | {cell.python} | {cell.pydantic_ai} | "
                     f"{pinned(cell.otel, 'opentelemetry-sdk')} ({cell.otel_label}) | {server.version} | "
                     f"{'taken' if server.gzip else 'refused: sent plain'} | "
                     f"{_inputs(server) if cell.supported else '-'} | "
                     f"{('set' if server.session else 'not set') if cell.supported else '-'} | "
                     f"{expected} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
