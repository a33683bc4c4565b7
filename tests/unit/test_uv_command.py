"""What ``traced-run uv run ...`` hands uv: the option that installs this very traced-run,
read from the install's own metadata (a dist-info written here, first on sys.path), at the
place in uv's command line where ``uv run`` takes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from traced_run.commands import uv

WITH = ["--with-editable", "/src/traced-run"]


def installed(directory: Path, version: str, direct_url: dict[str, object] | None) -> None:
    info = directory / f"traced_run-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: traced-run\nVersion: {version}\n")
    if direct_url is not None:
        (info / "direct_url.json").write_text(json.dumps(direct_url))


@pytest.mark.parametrize(("direct_url", "expected"), [
    (None, ["--with", "traced-run==9.1.2"]),
    ({"url": "file:///src/traced-run", "dir_info": {"editable": True}}, WITH),
    ({"url": "file:///src/my%20copy", "dir_info": {"editable": True}}, ["--with-editable", "/src/my copy"]),
    ({"url": "file:///src/traced-run", "dir_info": {}}, ["--with", "traced-run @ file:///src/traced-run"]),
    ({"url": "file:///w/traced_run-9.1.2-py3-none-any.whl", "archive_info": {}},
     ["--with", "traced-run @ file:///w/traced_run-9.1.2-py3-none-any.whl"]),
    ({"url": "https://example.org/r.git", "vcs_info": {"vcs": "git", "commit_id": "abc123"}},
     ["--with", "traced-run @ git+https://example.org/r.git@abc123"]),
], ids=["release", "editable", "editable, quoted path", "source tree", "wheel file", "git checkout"])
def test_uv_is_handed_this_very_install(direct_url: dict[str, object] | None, expected: list[str],
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    installed(tmp_path, "9.1.2", direct_url)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert uv.requirement() == expected


@pytest.mark.parametrize(("command", "expected"), [
    (["uv", "run", "app.py"], ["uv", "run", *WITH, "app.py"]),
    (["/opt/bin/uv", "run", "--offline", "python", "app.py"],
     ["/opt/bin/uv", "run", *WITH, "--offline", "python", "app.py"]),
    (["uv", "--directory", "run", "-q", "run", "app.py"],
     ["uv", "--directory", "run", "-q", "run", *WITH, "app.py"]),
    (["uv", "--color=never", "run", "app.py"], ["uv", "--color=never", "run", *WITH, "app.py"]),
    (["uvx", "--from", "pydantic-ai-slim[cli]", "clai"],
     ["uvx", *WITH, "--from", "pydantic-ai-slim[cli]", "clai"]),
    (["uv", "tool", "run", "clai"], ["uv", "tool", "run", *WITH, "clai"]),
    (["uv", "pip", "list"], None),
    (["uv", "--project", "run"], None),
    (["uv"], None),
    (["python", "run"], None),
], ids=["uv run", "a path to uv", "global options with values", "a global option=value", "uvx",
        "uv tool run", "uv pip",
        "no subcommand", "uv alone", "not uv"])
def test_the_option_goes_right_after_run(command: list[str], expected: list[str] | None,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    installed(tmp_path, "9.1.2", {"url": "file:///src/traced-run", "dir_info": {"editable": True}})
    monkeypatch.syspath_prepend(str(tmp_path))
    assert uv.with_traced_run(command) == expected


def test_without_an_installed_traced_run_uv_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a source tree on PYTHONPATH: nothing to hand uv, the command runs as the user
    gave it (and the app's Python says it cannot import traced_run)."""
    monkeypatch.setattr(uv, "DISTRIBUTION", "traced-run-never-installed")
    assert uv.with_traced_run(["uv", "run", "app.py"]) is None
