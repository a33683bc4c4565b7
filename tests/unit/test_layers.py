"""The import layers, asserted statically: each module's imports (at the top, inside
functions, under TYPE_CHECKING) are read with ``ast``, and none reaches a layer above
its own. Bottom to top: what every layer may use (``flags``, ``patches``, ``report``), ``config/``,
``transport/``, ``spans/``, ``delivery/``, ``pipeline/``, start-up (``bootstrap``,
``startcheck``, ``_boot``), ``commands/``. A new module must be placed in a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import traced_run

PACKAGE = Path(traced_run.__file__).resolve().parent

LAYERS = [
    ("base", ["traced_run", "traced_run.flags", "traced_run.patches", "traced_run.report"]),
    ("config", ["traced_run.config"]),
    ("transport", ["traced_run.transport"]),
    ("spans", ["traced_run.spans"]),
    ("delivery", ["traced_run.delivery"]),
    ("pipeline", ["traced_run.pipeline"]),
    ("start-up", ["traced_run.bootstrap", "traced_run.startcheck", "traced_run._boot"]),
    ("commands", ["traced_run.commands", "traced_run.__main__"]),
]
"""Bottom to top; a module belongs to the layer with the longest prefix of its name."""


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    found = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or (module.startswith(prefix + ".") and prefix != "traced_run")]
    return max(found)[1] if found else -1


def _imports(module: str, *, top_level_only: bool = False) -> set[str]:
    """The traced_run modules ``module`` imports; with ``top_level_only``, only those it
    imports when it is itself imported (not inside a function, not under TYPE_CHECKING)."""
    tree = ast.parse(MODULES[module].read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if top_level_only and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:
                    submodule = f"{child.module}.{alias.name}"
                    found.add(submodule if submodule in MODULES else child.module)
            visit(child)

    visit(tree)
    return {name for name in found if name == "traced_run" or name.startswith("traced_run.")}


def test_every_module_has_a_layer() -> None:
    assert [module for module in MODULES if _layer(module) < 0] == [], "place it in LAYERS"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_layer_above_its_own(module: str) -> None:
    above = {name: LAYERS[_layer(name)][0] for name in _imports(module) if _layer(name) > _layer(module)}
    assert above == {}, f"{module} ({LAYERS[_layer(module)][0]}) imports from layers above it"


def test_the_start_up_modules_import_at_start_only_what_start_up_needs() -> None:
    """What runs at every interpreter start (see tests/unit/test_startup.py for the modules of
    the standard library): ``bootstrap`` brings ``flags`` alone, the rest when needed."""
    assert _imports("traced_run.bootstrap", top_level_only=True) == {"traced_run.flags"}
    assert _imports("traced_run.flags") == set()
    assert _imports("traced_run.report") == set()
    assert _imports("traced_run._boot.sitecustomize") == {"traced_run.bootstrap"}
    assert _imports("traced_run.startcheck", top_level_only=True) == {"traced_run.flags"}


def test_the_delivery_thread_alone_imports_export() -> None:
    """``delivery.export`` (protobuf encoding, enrich) is imported by the delivery thread
    when it starts, never when the pipeline is built in the app's thread."""
    delivery = [module for module in MODULES
                if module.startswith("traced_run.delivery") and module != "traced_run.delivery.export"]
    assert [module for module in delivery
            if "traced_run.delivery.export" in _imports(module, top_level_only=True)] == []
