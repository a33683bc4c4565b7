"""``traced-run uv run ...``: uv runs the app with the project's own environment, which
need not list traced-run; there the bootstrap on PYTHONPATH cannot import traced_run and
the app would run untraced. Handed ``--with`` this very install of traced-run, uv adds it
to the environment of that run (the project itself is left as it is). The same for a
tool's environment under ``uvx`` / ``uv tool run``.
"""

from __future__ import annotations

import os

DISTRIBUTION = "traced-run"
_VALUED = frozenset({"--cache-dir", "--color", "--allow-insecure-host", "--directory", "--project",
                     "--config-file"})
"""uv's global options that take the next word as their value (uv 0.13): the word after
them is not the subcommand."""


def with_traced_run(command: list[str]) -> list[str] | None:
    """``command`` with uv's option that adds this traced-run right after ``run`` (``uv run``,
    ``uv tool run``) or ``uvx``; None for any other command."""
    index = _run_index(command)
    given = None if index is None else requirement()
    if index is None or given is None:
        return None
    return [*command[:index + 1], *given, *command[index + 1:]]


def _run_index(command: list[str]) -> int | None:
    program = os.path.basename(command[0]) if command else ""
    if program == "uvx":
        return 0
    if program != "uv":
        return None
    index = 1
    while index < len(command) and command[index].startswith("-"):
        index += 2 if command[index] in _VALUED else 1
    if command[index:index + 2] == ["tool", "run"]:
        return index + 1
    return index if command[index:index + 1] == ["run"] else None


def requirement() -> list[str] | None:
    """What uv needs to install the traced-run this launcher runs, as it is installed here
    (PEP 610's direct_url.json): a source tree installed editable stays editable, so the app
    runs the same code; a wheel, archive or checkout by its URL; a release by its version.
    None when it is not installed at all (run from a source tree on PYTHONPATH)."""
    # Imported here: the launcher's other commands have no use for them.
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlsplit

    try:
        distribution = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    try:
        direct = json.loads(distribution.read_text("direct_url.json") or "null")
    except ValueError:
        direct = None
    if not isinstance(direct, dict) or not isinstance(direct.get("url"), str):
        return ["--with", f"{DISTRIBUTION}=={distribution.version}"]
    url: str = direct["url"]
    dir_info, vcs_info = direct.get("dir_info"), direct.get("vcs_info")
    if isinstance(dir_info, dict) and dir_info.get("editable") and url.startswith("file:"):
        return ["--with-editable", unquote(urlsplit(url).path)]
    if isinstance(vcs_info, dict) and isinstance(vcs_info.get("vcs"), str):
        commit = vcs_info.get("commit_id")
        url = f"{vcs_info['vcs']}+{url}" + (f"@{commit}" if isinstance(commit, str) else "")
    return ["--with", f"{DISTRIBUTION} @ {url}"]
