"""uv as its users run apps: a uv project that lists pydantic-ai but not traced-run, the real
uv (from PyPI, pinned in the test extra), offline. uv installs from a local wheelhouse
made of this environment's own installed packages, so it downloads nothing."""

from __future__ import annotations

import base64
import hashlib
import platform
import re
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from conftest import AGENT_APP, BIN, App, spans_by_type, traced_env
from packaging.requirements import Requirement

UV = str(BIN / "uv")
PROJECT_NEEDS = ("pydantic-ai-slim",)
"""What the test project lists: the app's own dependency, not traced-run."""
UV_NEEDS = ("traced-run", *PROJECT_NEEDS, "hatchling", "editables")
"""What uv installs or builds with: traced-run is this editable install, which hatchling
builds as an editable with ``editables``."""


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed_closure(roots: tuple[str, ...]) -> list[metadata.Distribution]:
    """``roots`` and everything they require in this environment, extras followed."""
    found: dict[str, metadata.Distribution] = {}
    followed: set[tuple[str, tuple[str, ...]]] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(root, ()) for root in roots]
    while todo:
        name, extras = todo.pop()
        if (_key(name), extras) in followed:
            continue
        followed.add((_key(name), extras))
        distribution = found.setdefault(_key(name), metadata.distribution(name))
        for line in distribution.requires or []:
            required = Requirement(line)
            if required.marker is None or any(required.marker.evaluate({"extra": extra})
                                              for extra in ("", *extras)):
                todo.append((required.name, tuple(sorted(required.extras))))
    return list(found.values())


def _repack(distribution: metadata.Distribution, into: Path) -> None:
    """A wheel of an installed distribution, from the files its RECORD lists (scripts,
    which uv writes anew from entry_points.txt, and bytecode left out)."""
    wheel_info = distribution.read_text("WHEEL") or ""
    tag = next(line.split(":", 1)[1].strip() for line in wheel_info.splitlines() if line.startswith("Tag:"))
    name = re.sub(r"[-_.]+", "_", distribution.metadata["Name"]).lower()
    files = [path for path in distribution.files or []
             if path.parts[0] != ".." and "__pycache__" not in path.parts
             and path.name not in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")]
    dist_info = next(path.parts[0] for path in files if path.parts[0].endswith(".dist-info"))
    record = []
    with zipfile.ZipFile(into / f"{name}-{distribution.version}-{tag}.whl", "w") as wheel:
        for path in files:
            data = Path(str(distribution.locate_file(path))).read_bytes()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path.as_posix()},sha256={digest},{len(data)}")
            wheel.writestr(path.as_posix(), data)
        wheel.writestr(f"{dist_info}/RECORD", "\n".join([*record, f"{dist_info}/RECORD,,", ""]))


@pytest.fixture(scope="module")
def uv_offline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """uv's environment variables for a run that reaches no index: its settings in a file of
    their own (no index, the wheelhouse, offline, this machine's Pythons alone), this Python,
    a cache of its own."""
    root = tmp_path_factory.mktemp("uv")
    house = root / "wheelhouse"
    house.mkdir()
    for distribution in _installed_closure(UV_NEEDS):
        if _key(distribution.metadata["Name"]) != "traced-run":
            _repack(distribution, house)
    (root / "uv.toml").write_text(textwrap.dedent(f"""\
        no-index = true
        offline = true
        find-links = ["{house}"]
        python-downloads = "never"
        python-preference = "only-system"
    """))
    return {"UV_CONFIG_FILE": str(root / "uv.toml"), "UV_CACHE_DIR": str(root / "cache"),
            "UV_PYTHON": sys.executable}


def uv_project(directory: Path) -> None:
    """A uv project for this interpreter alone (the wheelhouse holds no other platform's
    wheels) whose app runs one agent; traced-run is none of its dependencies."""
    version = platform.python_version()
    (directory / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [project]
        name = "weather"
        version = "0.1.0"
        requires-python = "=={version}"
        dependencies = {list(PROJECT_NEEDS)!r}

        [tool.uv]
        environments = ["sys_platform == '{sys.platform}'"]
    """))
    (directory / "app.py").write_text(textwrap.dedent(AGENT_APP))


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_traced_run_uv_run_traces_a_project_that_does_not_list_traced_run(
        app: App, uv_offline: dict[str, str], strict: bool) -> None:
    """Under --strict too: the build backend's Python, which uv starts and which cannot
    import traced_run, does not stop the build (a cache of its own: uv builds anew)."""
    uv_project(app.directory)
    env = traced_env(app, **uv_offline)
    if strict:
        env["UV_CACHE_DIR"] = str(app.directory / "uv-cache")
    done = app.run(*(["--strict"] if strict else []), "uv", "run", "app.py", env=env, timeout=300)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert done.stdout.decode().strip(), "the app's own output"
    assert "traced-run:" not in stderr, stderr
    (trace,) = app.traces(1)
    assert {"AGENT", "LLM", "TOOL"} <= set(spans_by_type(trace))
    lock = (app.directory / "uv.lock").read_text()
    assert 'name = "traced-run"' not in lock, "the project is left as it was"


@pytest.mark.parametrize("strict", [False, True], ids=["untraced", "strict"])
def test_uv_run_traced_run_in_a_project_without_it_names_the_python_and_the_fix(
        app: App, uv_offline: dict[str, str], strict: bool) -> None:
    uv_project(app.directory)
    app.write("open('ran', 'w').close(); print('app ran')")
    command = [UV, "run", "traced-run", *(["--strict"] if strict else []), "python", "app.py"]
    done = subprocess.run(command, cwd=app.directory, env=traced_env(app, **uv_offline),
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("traced-run: ")]
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    python = app.directory / ".venv" / "bin" / "python"
    assert lines[0].startswith(f"traced-run: {python} cannot import traced_run: "), lines[0]
    assert "traced-run uv run" in lines[0] and "uv add traced-run" in lines[0], lines[0]
    if strict:
        assert done.returncode == 70 and not (app.directory / "ran").exists()
    else:
        assert (done.returncode, done.stdout) == (0, "app ran\n")


def test_traced_run_uvx_traces_a_tool_environment(app: App, uv_offline: dict[str, str]) -> None:
    app.write(AGENT_APP)
    done = app.run("uvx", "--from", "pydantic-ai-slim", "python", "app.py",
                   env=traced_env(app, **uv_offline), timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert "traced-run:" not in done.stderr.decode()
    (trace,) = app.traces(1)
    assert {"AGENT", "LLM", "TOOL"} <= set(spans_by_type(trace))
