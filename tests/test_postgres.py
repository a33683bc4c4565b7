"""MLflow on PostgreSQL, the production backend store: a real PostgreSQL from
the machine's server binaries, a real MLflow on it, a traced app, and the
trace read back exactly as the same app's trace reads back from the sqlite
MLflow of the session."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT_APP, App, MlflowServer, free_port, spans_by_type, start_mlflow

PG_BINARIES = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def _as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port; yields its URI for MLflow."""
    if not PG_BINARIES:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin "
                    "(.ci/run installs Debian's postgresql when CI=true)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
    pytest.importorskip("psycopg2", reason="MLflow needs psycopg2 for postgresql:// URIs")
    bindir = Path(PG_BINARIES[-1]).parent
    # Not under pytest's tmp dir: that is private to the test user, and the server user must own its data.
    root = Path(tempfile.mkdtemp(prefix="traced-run-pg-"))
    data, log = root / "data", root / "server.log"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    port = free_port()
    run = lambda *argv: subprocess.run(_as_server_user([str(a) for a in argv]),  # noqa: E731
                                       capture_output=True, text=True, timeout=120, check=True)
    try:
        run(bindir / "initdb", "-D", data, "-U", "mlflow", "--auth=trust", "--no-sync", "-E", "UTF8")
        run(bindir / "pg_ctl", "-D", data, "-l", log, "-w", "-t", "60", "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "mlflow", "mlflow")
        # psycopg2 named explicitly: SQLAlchemy 2.1 would pick psycopg 3 for a bare postgresql://.
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"
    except subprocess.CalledProcessError as error:
        pytest.fail(f"PostgreSQL did not start: {error.cmd}: {error.stderr}"
                    f"{log.read_text() if log.exists() else ''}")
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            subprocess.run(_as_server_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                                            "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_on_postgres(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    # The first start creates MLflow's schema in PostgreSQL (its migrations): slower than sqlite.
    with start_mlflow(postgres, tmp_path_factory.mktemp("mlflow-pg"), health_timeout=300) as server:
        yield server


VOLATILE_TAGS = ("mlflow.trace_schema", "mlflow.artifactLocation", "mlflow.trace.sizeBytes",
                 "mlflow.trace.sizeStats", "process.pid")


def shape(trace: Any) -> dict[str, Any]:
    """What a user reads from a trace, without ids, times and per-process values."""
    spans = {span.span_id: span for span in trace.data.spans}
    rows = []
    for span in trace.data.spans:
        parent = spans[span.parent_id].name if span.parent_id in spans else None
        rows.append({
            "name": span.name, "type": str(span.span_type), "parent": parent,
            "inputs": json.dumps(span.inputs, sort_keys=True, default=str),
            "outputs": json.dumps(span.outputs, sort_keys=True, default=str),
            "attributes": sorted(span.attributes),
            "status": str(span.status.status_code),
        })
    info = trace.info
    return {
        "spans": sorted(rows, key=lambda row: json.dumps(row, sort_keys=True)),
        "state": str(info.state),
        "request_preview": info.request_preview,
        "response_preview": info.response_preview,
        "tags": sorted(k for k in info.tags if not k.startswith(VOLATILE_TAGS)),
        "token_usage": info.token_usage,
    }


def test_traces_read_back_from_postgresql_as_from_sqlite(
        tmp_path: Path, mlflow_server: MlflowServer, mlflow_on_postgres: MlflowServer) -> None:
    shapes = []
    for server in (mlflow_server, mlflow_on_postgres):
        app = App(tmp_path / server.url.rsplit(":", 1)[1], server, f"pg-{uuid.uuid4().hex[:8]}")
        app.directory.mkdir()
        app.write(AGENT_APP)
        done = app.run("python", "app.py", env=app.env(TRACED_RUN_EXIT_TIMEOUT="60",
                                                       OTEL_SERVICE_NAME="support-app"))
        assert done.returncode == 0, done.stderr.decode()
        (trace,) = app.traces(1, timeout=60)
        assert set(spans_by_type(trace)) >= {"AGENT", "LLM", "TOOL"}
        shapes.append(shape(trace))
    on_sqlite, on_postgres = shapes
    assert on_postgres == on_sqlite
