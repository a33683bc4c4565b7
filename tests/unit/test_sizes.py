"""The size budget of issue 12, asserted: no class in src/ over 200 lines and no
function over 50, unless a ``# Long on purpose: <why>`` comment is in its first ten lines.
Past that size a part is hard to change safely; split it along its seams instead."""

from __future__ import annotations

import ast
from pathlib import Path

import traced_run

PACKAGE = Path(traced_run.__file__).resolve().parent
LIMITS = {ast.ClassDef: 200, ast.FunctionDef: 50, ast.AsyncFunctionDef: 50}
REASON = "# Long on purpose:"


def _over_budget() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            limit = LIMITS.get(type(node))
            if limit is None:
                continue
            assert isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            top = lines[node.lineno - 1:node.lineno + 9]
            if length > limit and not any(line.strip().startswith(REASON) for line in top):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    return found


def test_no_class_or_function_is_over_its_budget_without_a_reason() -> None:
    assert _over_budget() == []
