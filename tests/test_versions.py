"""Agent versions with no code (issue 26 item 7): every trace linked to a LoggedModel
(MLFLOW_ACTIVE_MODEL_ID, else the git commit the app runs from, or a named version) and
to MLFLOW_RUN_ID, against the session's real MLflow; and the git checkout as traced-run
reads it from ``.git``, compared with what git itself says."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import AGENT_APP, App, poll, traced_env

from traced_run.config import git

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": os.devnull}


FINAL = "mlflow.trace.infoFinalized"
"""Set by the link (StartTraceV3): the trace has its link."""


def run_git(directory: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=directory, env={**os.environ, **GIT_ENV}, check=True,
                          capture_output=True, text=True)
    return done.stdout.strip()


def commit_all(directory: Path, message: str = "app") -> str:
    run_git(directory, "add", "-A")
    run_git(directory, "commit", "-q", "-m", message)
    return run_git(directory, "rev-parse", "HEAD")


def repository(directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    run_git(directory, "init", "-q", "-b", "main")
    (directory / ".gitignore").write_text("spool/\n")
    return directory


def linked_trace(app: App, **filters: Any) -> Any:
    """The app's one trace once MLflow has its link (its info made final)."""
    import mlflow

    mlflow.set_tracking_uri(app.server.url)

    def found() -> Any:
        experiment_id = app.server.experiment_id(app.experiment)
        if experiment_id is None:
            return None
        traces = mlflow.search_traces(locations=[experiment_id], return_type="list", **filters)
        return next((trace for trace in traces if trace.info.trace_metadata.get(FINAL)), None)

    return poll(found, timeout=60, what="a linked trace")


def test_active_model_id_links_every_trace_and_the_run(app: App) -> None:
    client = app.server.client()
    experiment_id = client.create_experiment(app.experiment)
    model = client.create_logged_model(experiment_id=experiment_id, name="support-bot")
    run = client.create_run(experiment_id)
    app.write(AGENT_APP)
    done = app.run("python", "app.py", env=traced_env(app, MLFLOW_ACTIVE_MODEL_ID=model.model_id,
                                                      MLFLOW_RUN_ID=run.info.run_id,
                                                      TRACED_RUN_SESSION_ID="chat-7"))
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""

    trace = linked_trace(app, model_id=model.model_id)
    assert trace.info.trace_metadata["mlflow.modelId"] == model.model_id
    assert trace.info.trace_metadata["mlflow.sourceRun"] == run.info.run_id
    # The link merges into what MLflow stored from the spans: previews, session and tokens stay.
    assert "Paris" in trace.info.request_preview
    assert trace.info.response_preview
    assert trace.info.trace_metadata["mlflow.trace.session"] == "chat-7"
    assert "total_tokens" in trace.info.trace_metadata["mlflow.trace.tokenUsage"]
    assert str(trace.info.state).endswith("OK")
    assert len(trace.data.spans) == 4


def test_an_app_run_from_a_fresh_commit_is_linked_to_that_commits_version(app: App) -> None:
    repository(app.directory)
    run_git(app.directory, "remote", "add", "origin", "https://ci-bot:s3cret@git.example.com/team/bot.git")
    app.write(AGENT_APP)
    commit = commit_all(app.directory)

    first = app.run("python", "app.py", env=traced_env(app))
    assert first.returncode == 0, first.stderr
    model_id = linked_trace(app).info.trace_metadata["mlflow.modelId"]
    model = app.server.client().get_logged_model(model_id)
    assert model.tags["mlflow.source.git.commit"] == commit
    assert model.tags["mlflow.source.git.branch"] == "main"
    assert model.tags["mlflow.source.git.dirty"] == "false"
    assert model.tags["mlflow.source.git.repoURL"] == "https://git.example.com/team/bot.git"
    assert b"s3cret" not in first.stderr

    # The same commit again: the same version, found, not made twice.
    second = app.run("python", "app.py", env=traced_env(app))
    assert second.returncode == 0, second.stderr
    traces = poll(lambda: [t for t in app.traces(2) if t.info.trace_metadata.get(FINAL)][1:] and
                  app.traces(2), timeout=60, what="two linked traces")
    assert {t.info.trace_metadata["mlflow.modelId"] for t in traces} == {model_id}


def test_a_named_version_and_off(app: App) -> None:
    repository(app.directory)
    app.write(AGENT_APP)
    commit_all(app.directory)
    named = app.run("python", "app.py", env=traced_env(app, TRACED_RUN_AGENT_VERSION="support-v2"))
    assert named.returncode == 0, named.stderr
    model = app.server.client().get_logged_model(linked_trace(app).info.trace_metadata["mlflow.modelId"])
    assert model.name == "support-v2"

    off = app.run("python", "app.py", env=traced_env(app, TRACED_RUN_AGENT_VERSION="off"))
    assert off.returncode == 0, off.stderr
    unlinked = [t for t in app.traces(2) if FINAL not in t.info.trace_metadata]
    assert len(unlinked) == 1


def test_a_trace_spooled_while_mlflow_was_away_is_linked_when_sent(app: App, proxy: Any) -> None:
    client = app.server.client()
    experiment_id = client.create_experiment(app.experiment)
    model = client.create_logged_model(experiment_id=experiment_id)
    app.write(AGENT_APP)
    proxy.mode = "refuse"
    env = traced_env(app, MLFLOW_TRACKING_URI=proxy.url, MLFLOW_ACTIVE_MODEL_ID=model.model_id,
                     TRACED_RUN_EXIT_TIMEOUT="2")
    away = app.run("python", "app.py", env=env)
    assert away.returncode == 0, away.stderr
    assert b"kept in" in away.stderr
    proxy.mode = "forward"
    flushed = app.run("flush", env=env)
    assert flushed.returncode == 0, flushed.stderr + flushed.stdout
    assert linked_trace(app, model_id=model.model_id).info.trace_metadata["mlflow.modelId"] == model.model_id


# -- the checkout, read from .git ------------------------------------------------------------

def test_the_checkout_as_git_says_it(tmp_path: Path) -> None:
    work = repository(tmp_path / "repo")
    (work / "a.txt").write_text("a\n")
    (work / "sub").mkdir()
    (work / "sub" / "b.txt").write_text("b\n")
    commit = commit_all(work)
    read = git.read(work / "sub")
    assert read == git.Checkout("main", commit, False, None)

    os.utime(work / "a.txt", (1, 1))  # touched, same content: git says clean
    assert not git.read(work).dirty  # type: ignore[union-attr]
    (work / "a.txt").write_text("changed\n")
    assert git.read(work).dirty  # type: ignore[union-attr]
    run_git(work, "update-index", "--index-version", "4")
    assert git.read(work).dirty  # type: ignore[union-attr]
    run_git(work, "checkout", "-q", "a.txt")
    assert not git.read(work).dirty  # type: ignore[union-attr]
    (work / "sub" / "b.txt").unlink()
    assert git.read(work).dirty  # type: ignore[union-attr]


def test_a_linked_worktree_packed_refs_and_a_detached_head(tmp_path: Path) -> None:
    work = repository(tmp_path / "repo")
    (work / "a.txt").write_text("a\n")
    commit = commit_all(work)
    run_git(work, "pack-refs", "--all")
    run_git(work, "worktree", "add", "-q", "-b", "feature", str(tmp_path / "wt"))
    assert git.read(tmp_path / "wt") == git.Checkout("feature", commit, False, None)
    assert git.read(work).branch == "main"  # type: ignore[union-attr]
    run_git(work, "checkout", "-q", "--detach")
    with pytest.raises(git.GitUnreadable, match="detached"):
        git.read(work)
    assert git.read(tmp_path) is None  # outside any checkout


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:token@github.com/o/r.git", "https://github.com/o/r.git"),
    ("git@github.com:o/r.git", "git@github.com:o/r.git"),
    ("ssh://git@host/o/r", "ssh://host/o/r"),
    ("/srv/repos/r.git", "/srv/repos/r.git"),
])
def test_the_repository_url_has_no_credentials(url: str, shown: str) -> None:
    assert git.without_credentials(url) == shown


def test_the_doctor_says_what_traces_are_linked_to(app: App) -> None:
    repository(app.directory)
    app.write(AGENT_APP)
    commit = commit_all(app.directory)
    done = app.run("doctor", env=traced_env(app, MLFLOW_RUN_ID="run-1"))
    line = next(line for line in done.stdout.decode().splitlines() if line.startswith("OK agent version:"))
    assert f"git commit {commit[:12]} on main" in line and "run run-1" in line

    # A detached HEAD (a CI checkout) has no branch, so no git version: the doctor says why, the app
    # runs with not a line more.
    run_git(app.directory, "checkout", "-q", "--detach")
    done = app.run("doctor", env=traced_env(app))
    assert "OK agent version: traces are linked to no agent version (agent_version: git, HEAD is detached" \
        in done.stdout.decode()
    ran = app.run("python", "app.py", env=traced_env(app))
    assert (ran.returncode, ran.stderr) == (0, b"")
