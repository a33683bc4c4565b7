"""``traced-run mlflow``: a real local MLflow server started, answering, and
stopped with everything it started when the command gets SIGTERM."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TRACED_RUN, clean_env, free_port, poll


def processes_using(directory: Path) -> list[str]:
    """Command lines of live processes that name ``directory`` (the server and its children do)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(directory) in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@contextlib.contextmanager
def started(tmp_path: Path, *options: str) -> Iterator[subprocess.Popen[str]]:
    """``traced-run mlflow`` running; killed after the block if a failed assert left it running."""
    command = subprocess.Popen([TRACED_RUN, "mlflow", "--dir", str(tmp_path / "data"), *options],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env(),
                               cwd=tmp_path)
    try:
        yield command
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()


def plant_modules(directory: Path, ran: Path) -> None:
    """A module named like every standard library module, and like mlflow and uvicorn (which
    the server starts with -m), each noting that it ran."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in {*sys.stdlib_module_names, "mlflow", "uvicorn"}:
        (directory / f"{name}.py").write_text(f"open({str(ran)!r}, 'a').write({name!r} + ' ')\n")


@pytest.mark.e2e  # `traced-run mlflow` starts a real MLflow server
def test_starts_answers_and_stops_on_sigterm(tmp_path: Path) -> None:
    """Also: the working directory and the data directory (a cloned repository's
    ./.traced-run/mlflow) are not where the server's Python looks for modules."""
    port = free_port()
    ran = tmp_path / "ran"
    plant_modules(tmp_path, ran)
    plant_modules(tmp_path / "data", ran)
    with started(tmp_path, "--port", str(port)) as command:
        assert command.stdout is not None
        lines = []
        for line in command.stdout:  # ends when the command exits: then the assert below says why
            lines.append(line)
            if line.startswith("Ctrl-C stops it."):
                break
        output = "".join(lines)
        running = re.search(r"MLflow is running \(pid (\d+)\): (http://127\.0\.0\.1:\d+)", output)
        if not running and command.poll() is not None and command.stderr:
            output += command.stderr.read()
        assert running, output
        pid, url = int(running[1]), running[2]
        assert url == f"http://127.0.0.1:{port}"
        assert f"export MLFLOW_TRACKING_URI={url}" in output
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            assert response.status == 200
        assert (tmp_path / "data" / "mlflow.db").is_file()
        assert processes_using(tmp_path / "data")

        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=60) == 0
        try:
            os.killpg(pid, 0)
            raise AssertionError("the server's process group is still there")
        except ProcessLookupError:
            pass
        assert processes_using(tmp_path / "data") == []
    assert not ran.exists(), f"ran from the working or data directory: {ran.read_text()}"


@pytest.mark.e2e  # `traced-run mlflow` starts a real MLflow server
def test_all_hosts_on_every_address_warns_and_sigterm_stops_the_start(tmp_path: Path) -> None:
    with started(tmp_path, "--port", str(free_port()), "--host", "0.0.0.0", "--allow-all-hosts") as command:
        assert command.stderr is not None
        warning = command.stderr.readline()
        assert warning.startswith("traced-run: WARNING: MLflow listens on 0.0.0.0:"), warning
        assert "any Host header" in warning
        # The command's own line names the directory too: wait for the server it starts,
        # which it starts after it handles SIGTERM.
        poll(lambda: [p for p in processes_using(tmp_path / "data") if not p.startswith(f"{command.pid}:")],
             timeout=30, what="the server process")
        command.send_signal(signal.SIGTERM)
        assert command.wait(timeout=60) == 0
        assert command.stderr.read() == "", "one warning line, nothing else"
        assert processes_using(tmp_path / "data") == []


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = subprocess.run([TRACED_RUN, "mlflow", "--dir", str(tmp_path), "--port",
                               str(busy.getsockname()[1])], capture_output=True, text=True, env=clean_env(),
                              timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("traced-run: ") and "is in use" in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_without_mlflow_says_how_to_install_and_exits_69(tmp_path: Path) -> None:
    # An environment where `mlflow` cannot be found: a None entry in sys.modules is what
    # the import system reports as "not installed".
    program = ("import sys; sys.modules['mlflow'] = None; from traced_run.commands.cli import main; "
               "sys.exit(main(['mlflow', '--dir', sys.argv[1]]))")
    done = subprocess.run([sys.executable, "-c", program, str(tmp_path)], capture_output=True, text=True,
                          env=clean_env(), timeout=60)
    assert done.returncode == 69, done.stderr
    assert done.stderr == "traced-run: mlflow is not installed in this environment: " \
                          "pip install 'traced-run[mlflow]'\n"
    assert done.stdout == ""
