"""docs/messages.md lists every line traced-run prints; this test fails when a line's text
is not on it.

What counts as a line's text is read from the source, not from a list kept here: every piece
of prose in ``src/traced_run`` (a string literal, or the fixed text of an f-string between
its placeholders, with at least two words) is part of something traced-run says, unless it
is a docstring, an annotation, ``--help`` text (``help=``, ``description=``, ``epilog=``) or
in a place below that writes somewhere else than stderr or a command's output. Following
the messages from their ``say()`` calls would miss the pieces built elsewhere (the exit
line's parts, an HTTP problem, a setting's reason); prose is where they all are. A piece
that is prose but no message (a Python snippet, say) goes into ``NOT_SAID`` with why.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from traced_run import report

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "src" / "traced_run"
PAGE = ROOT / "docs" / "messages.md"

NOT_SAID = {
    "config/reference.py": "writes docs/settings.md and the example config (tests/unit/test_reference.py)",
    "spans/enrich.py": "placeholders written into a trace's content, shown in MLflow (docs/trace-quality.md)",
    "spans/messages.py": "placeholders written into a trace's content",
    "spans/redact.py": "placeholders written into a trace's content (docs/security.md)",
    "commands/doctor.py:PROBE": "the Python program the doctor runs with `python -c`",
    "commands/cli.py:EPILOG": "--help text",
    "spans/selection.py:_NO_AGENT": "a span's fate, not said",
    "spans/selection.py:_LEFT_TO_MLFLOW": "a span's fate, not said",
    "spans/selection.py:LEFT_OPEN": "why a killed process's root ended, written into its status",
    "delivery/__init__.py:close": "what cut a run off, written into its spans' status",
    "delivery/exits.py:install": "what cut a run off, written into its spans' status",
    "config/git.py:_ON_BRANCH": "what .git/HEAD holds",
    "transport/connections.py:left": "a TimeoutError's text: the line says `no answer within <n> s`",
}
"""Modules, or ``module:NAME`` (a function or an assignment's target), whose prose is not said."""
RAISED_ONLY = {"config/settings.py"}
"""Modules whose other prose is the settings table (docs/settings.md): what they say is what
they raise, and the reasons they build ahead, which start with ``expected``."""
HELP_KEYWORDS = {"help", "description", "epilog", "usage"}
_WORDS = re.compile(r"[A-Za-z]\S*\s+\S*[A-Za-z]")
_EDGES = " \t\n:;,.()[]"


def _skipped(tree: ast.Module) -> set[int]:
    """ids of the nodes whose strings are not said: docstrings, annotations, help texts."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skipped.add(id(node.value))  # a docstring, of a module, class, function or attribute
        elif isinstance(node, (ast.arg, ast.AnnAssign)) and node.annotation is not None:
            skipped.update(id(inner) for inner in ast.walk(node.annotation))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            skipped.update(id(inner) for inner in ast.walk(node.returns))
        elif isinstance(node, ast.keyword) and node.arg in HELP_KEYWORDS:
            skipped.update(id(inner) for inner in ast.walk(node.value))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("cast", "re.compile"):
            skipped.update(id(inner) for inner in ast.walk(node.args[0]))
    return skipped


def _named_not_said(module: str, tree: ast.Module) -> set[int]:
    """ids of the nodes under a function or assignment NOT_SAID names."""
    names = {key.partition(":")[2] for key in NOT_SAID if key.startswith(module + ":")}
    found: set[int] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            targets = [node.name]
        elif isinstance(node, ast.Assign):
            targets = [target.id for target in node.targets if isinstance(target, ast.Name)]
        if names.intersection(targets):
            found.update(id(inner) for inner in ast.walk(node))
    return found


def pieces(module: str, source: str) -> Iterator[tuple[int, str]]:
    """(line, text) of every piece of prose in one module that traced-run says."""
    tree = ast.parse(source)
    skipped = _skipped(tree) | _named_not_said(module, tree)
    raised = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.Raise) for inner in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.JoinedStr):
            skipped.update(id(value) for value in node.values)
            texts = [value.value for value in node.values if isinstance(value, ast.Constant)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts = [node.value]
        else:
            continue
        for text in texts:
            text = normal(text).strip(_EDGES)
            if module in RAISED_ONLY and id(node) not in raised and not text.startswith("expected"):
                continue
            if _WORDS.search(text):
                yield node.lineno, text


def normal(text: str) -> str:
    """Text as the page is compared: one space for any whitespace, no backticks (Markdown's
    code spans), a table cell's ``\\|`` as ``|``."""
    return " ".join(text.replace("`", "").replace("\\|", "|").split())


def said() -> dict[str, str]:
    """Every piece of prose traced-run says, with the first place it is in."""
    found: dict[str, str] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        module = path.relative_to(SOURCE).as_posix()
        if module in NOT_SAID:
            continue
        for line, text in pieces(module, path.read_text()):
            found.setdefault(text, f"src/traced_run/{module}:{line}")
    return found


def test_every_piece_of_every_line_is_on_the_messages_page() -> None:
    page = normal(PAGE.read_text())
    missing = [f"{where}: {text!r}" for text, where in said().items() if text not in page]
    assert not missing, ("docs/messages.md does not have these pieces of what traced-run says; "
                         "document each line where its kind is:\n" + "\n".join(missing))


def exit_codes() -> dict[str, int]:
    """Every ``EXIT_<NAME> = <code>`` of the source's modules."""
    codes: dict[str, int] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                    and isinstance(node.value.value, int):
                codes.update((target.id, node.value.value) for target in node.targets
                             if isinstance(target, ast.Name) and target.id.startswith("EXIT_"))
    return codes


def test_the_page_has_a_row_for_every_exit_code() -> None:
    codes = exit_codes()
    assert codes["EXIT_CONFIG"] == report.EXIT_CONFIG
    page = PAGE.read_text()
    for name, value in codes.items():
        assert re.search(rf"^\| {value} \|", page, re.M), f"docs/messages.md: no exit code {value} ({name})"


def test_the_pieces_are_found_where_they_are_built() -> None:
    """The reading itself: an f-string's fixed text, a literal a line is made from, not a
    docstring, an annotation or --help text, nor a one-word piece."""
    source = '''
"""Module docstring, not said."""
def f(x: "Some | None", parser) -> "Other | None":
    """Function docstring, not said."""
    parser.add_argument("--x", help="help text is not said")
    reason = "a reason it gives"
    say(f"cannot   do {x}: {reason} (see `it`)")
    return f"{x} of {x}"
'''
    assert sorted(pieces("m.py", source)) == [(6, "a reason it gives"), (7, "cannot do"), (7, "see it")]
