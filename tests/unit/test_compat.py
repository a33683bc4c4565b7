"""Supported versions: docs/supported-versions.md's table is the compatibility matrix's definition
(tests/compat/matrix.py; tests/compat/cells.py runs it), the ranges traced-run
checks at run time are the ones pyproject.toml declares, and a release outside
them is named in one sentence with the range and the fix."""

from __future__ import annotations

import http.server
import re
import sys
import threading
from pathlib import Path

import pytest
from conftest import QuietHandler

from traced_run.config import compat
from traced_run.config.settings import Settings
from traced_run.delivery.export import Sender
from traced_run.delivery.spool import Target

sys.path.insert(0, str(Path(__file__).parents[1] / "compat"))
import matrix

PAGE = Path(__file__).resolve().parents[2] / "docs" / "supported-versions.md"


def test_the_supported_versions_table_is_the_matrix() -> None:
    text = PAGE.read_text()
    found = re.search(r"<!-- compat-matrix:begin -->\n(.*?)<!-- compat-matrix:end -->", text, re.S)
    assert found, "docs/supported-versions.md lost its compat-matrix markers"
    assert found.group(1) == matrix.table(), "regenerate it: python tests/compat/matrix.py"


def test_the_ranges_checked_at_run_time_are_pyprojects() -> None:
    declared = matrix.supported_ranges()
    installed = compat.ranges()
    for name in (*compat.CHECKED, compat.MLFLOW):
        assert installed[name] == declared[name], f"{name}: reinstall traced-run (pip install -e .)"


def test_every_cell_stays_inside_the_ranges_but_the_one_below_the_floor() -> None:
    ranges = matrix.supported_ranges()
    for cell in matrix.CELLS:
        inside = compat.allows(ranges["pydantic-ai-slim"], cell.pydantic_ai)
        assert inside == cell.supported, cell
        assert compat.allows(ranges["opentelemetry-sdk"], matrix.pinned(cell.otel, "opentelemetry-sdk"))
        assert compat.allows(ranges["mlflow"], cell.server)
        assert compat.allows(ranges["python"], cell.python)


@pytest.mark.parametrize(("specifier", "version", "allowed"), [
    (">=1.32,<3", "1.32.0", True),
    (">=1.32,<3", "2.68.0", True),
    (">=1.32,<3", "1.31.9", False),
    (">=1.32,<3", "3.0.0", False),
    (">=1.32,<3", "3.0.0b1", False),
    (">=0.60b0", "0.60b0", True),
    (">=0.60b0", "0.59b0", False),
    (">=3.6", "3.6.0", True),
    (">=3.6", "3.5.1", False),
    (">=3.6", "3.18.0.dev0", True),
])
def test_allows_compares_release_numbers(specifier: str, version: str, allowed: bool) -> None:
    assert compat.allows(specifier, version) is allowed


def test_ranges_come_from_dependencies_and_the_two_extras_only() -> None:
    requirements = ["opentelemetry-sdk>=1.39", "pyyaml>=6",
                    'pydantic-ai-slim>=1.32,<3; extra == "pydantic-ai"', 'mlflow>=3.6; extra == "mlflow"',
                    'pytest>=8; extra == "test"', 'traced-run[mlflow,pydantic-ai]; extra == "test"']
    assert compat.ranges(requirements) == {"opentelemetry-sdk": ">=1.39", "pyyaml": ">=6",
                                           "pydantic-ai-slim": ">=1.32,<3", "mlflow": ">=3.6"}


def test_a_release_outside_its_range_is_one_sentence_with_the_range_and_the_fix() -> None:
    installed = {"pydantic-ai-slim": "1.31.0", "opentelemetry-sdk": "1.45.2"}
    found = compat.problems(installed.get, {"pydantic-ai-slim": ">=1.32,<3", "opentelemetry-sdk": ">=1.39"})
    assert found == ["pydantic-ai-slim 1.31.0 is not supported (traced-run supports "
                     "pydantic-ai-slim>=1.32,<3; pip install 'pydantic-ai-slim>=1.32,<3')"]
    assert compat.problems({"opentelemetry-sdk": "1.45.2"}.get, {"pydantic-ai-slim": ">=1.32,<3"}) == []


class _PlainOnly(QuietHandler):
    """MLflow 3.6's answers: a compressed body is read as protobuf and refused."""

    seen: list[str | None]
    takes_plain: bool

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        encoding = self.headers.get("Content-Encoding")
        self.seen.append(encoding)
        if encoding or not self.takes_plain:
            self.answer(400, b'{"detail":"Invalid OpenTelemetry protobuf format"}')
        else:
            self.answer(200, b"{}", "application/json")


@pytest.mark.parametrize("takes_plain", [True, False], ids=["plain taken", "nothing taken"])
def test_a_server_that_refuses_gzip_gets_plain_bodies_learnt_once(takes_plain: bool) -> None:
    seen: list[str | None] = []
    handler = type("Handler", (_PlainOnly,), {"seen": seen, "takes_plain": takes_plain})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        target = Target(f"http://127.0.0.1:{server.server_port}/v1/traces", "0", None, None)
        sender = Sender(Settings(tracking_uri=f"http://127.0.0.1:{server.server_port}"))
        first = sender.post(b"", target, timeout=30)  # a deadline only a hang reaches
        second = sender.post(b"", target, timeout=30)
    finally:
        server.shutdown()
    if takes_plain:
        # the refused batch is sent again plain; later ones go plain at once
        assert (first.delivered, second.delivered) == (True, True)
        assert seen == ["gzip", None, None]
    else:
        # a batch the server refuses either way is set aside as refused, and the plain try is not repeated
        assert (first.invalid, second.invalid) == (True, True)
        assert "Invalid OpenTelemetry protobuf format" in first.reason
        assert seen == ["gzip", None, "gzip"]


def test_a_python_the_machine_lacks_is_found_missing_so_its_cell_is_skipped_not_passed() -> None:
    import cells

    assert cells.interpreter("3.99") is None
    found = cells.interpreter(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert found and Path(found).exists()
