"""The spool protocol in-process, fast (no MLflow, no subprocess): put, claim,
done, release, reject, reclaim stale claims, the bound, and the files a
hostile neighbour or a crash can leave (issue 16, findings 1, 2, 5 and 7).

Each hostile case is one a test on the code before the fix (066f5f4) fails:
it hung, crashed, followed a symlink, chmod-ed what it did not make, or
stored a password."""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from traced_run.delivery import spool as spool_module
from traced_run.delivery.export import Outcome
from traced_run.delivery.spool import Spool, Target

if TYPE_CHECKING:
    from traced_run.delivery.spool import Batch

ENDPOINT = "http://127.0.0.1:9/v1/traces"
TARGET = Target(ENDPOINT, "0", None, None)
BOUND = 30.0
"""Seconds a spool operation may take here: a blocked one (a FIFO) takes for ever, a loaded
machine's takes well under a second."""


def bounded(step: Callable[[], object]) -> object:
    """``step()`` on a thread, failing the test when it does not finish within BOUND."""
    result: list[object] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(step())
        except BaseException as error:  # handed to the test's thread
            failure.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(BOUND)
    assert not worker.is_alive(), f"still running after {BOUND} s (blocked)"
    if failure:
        raise failure[0]
    return result[0]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", 1 << 20)


def taken(spool: Spool, endpoint: str = ENDPOINT) -> list[Batch]:
    """Claim every batch for ``endpoint`` and mark it sent."""
    batches = list(spool.claim(endpoint))
    for batch in batches:
        spool.done(batch)
    return batches


def plant(spool: Spool, content: bytes, name: str = "00000000000000000001-1-0000000a.otlp") -> Path:
    """A file named like a batch, written by someone else than ``put``."""
    spool.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = spool.directory / name
    path.write_bytes(content)
    return path


# --- the protocol ------------------------------------------------------------------------


def test_put_claim_done_round_trip(spool: Spool) -> None:
    name, orphans = spool.put(TARGET, 3, 1, b"payload")
    assert name is not None and orphans == 0
    entry = spool_module.parse(name)
    assert entry is not None and entry.writer == os.getpid() and entry.kind == "otlp"
    (batch,) = taken(spool)
    assert (batch.name, batch.spans, batch.traces, batch.payload) == (name, 3, 1, b"payload")
    assert batch.target == TARGET
    assert spool.survey(ENDPOINT).batches == 0 and not list(spool.directory.glob("*.otlp*"))


def test_claim_is_oldest_first_and_only_for_its_endpoint(spool: Spool) -> None:
    first, _ = spool.put(TARGET, 1, 1, b"1")
    other, _ = spool.put(Target("http://other:5000/v1/traces", "0", None, None), 1, 1, b"x")
    second, _ = spool.put(TARGET, 1, 1, b"2")
    assert [b.name for b in taken(spool)] == [first, second]
    assert spool.survey("http://other:5000/v1/traces").for_endpoint == 1 and other is not None


def test_release_gives_a_batch_back_and_reject_sets_it_aside_with_the_reason(spool: Spool) -> None:
    name, _ = spool.put(TARGET, 2, 1, b"p")
    (batch,) = spool.claim(ENDPOINT)
    assert (spool.directory / name).exists() is False
    spool.release(batch)
    assert (spool.directory / name).exists()
    (batch,) = spool.claim(ENDPOINT)
    aside = spool.reject(batch, "HTTP 404 Not Found: \x1b[31mgone\r\nFAKE LINE")
    assert aside == spool.rejected / name and aside.exists()
    reason = (spool.rejected / name.replace(".otlp", ".reason.txt")).read_text()
    assert reason == "HTTP 404 Not Found: \\x1b[31mgone\\x0d\\x0aFAKE LINE\n"  # escaped: one line, no colour
    assert spool.survey(ENDPOINT).rejected == 1


def test_send_follows_the_protocol_and_stops_at_the_first_batch_not_taken(spool: Spool) -> None:
    names = [spool.put(TARGET, 1, 1, bytes([i]))[0] for i in range(4)]
    answers = iter([Outcome(True, False, "", 200), Outcome(False, True, "HTTP 400", 400),
                    Outcome(False, False, "connection refused")])
    sent = [(batch.name, outcome.delivered, aside) for batch, outcome, aside in
            spool.send(ENDPOINT, lambda batch: next(answers))]
    assert sent == [(names[0], True, None), (names[1], False, spool.rejected / str(names[1])),
                    (names[2], False, None)]
    assert sorted(p.name for p in spool.directory.glob("*.otlp")) == [names[2], names[3]]


def test_a_claim_of_a_process_that_died_is_given_back(spool: Spool) -> None:
    name, _ = spool.put(TARGET, 1, 1, b"p")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    os.rename(spool.directory / str(name), spool.directory / f"{name}.claimed-{dead}")
    assert [b.name for b in taken(spool)] == [name]


def test_the_bound_removes_the_oldest_and_counts_what_ended_processes_lose(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 3000)
    first, _ = spool.put(TARGET, 7, 1, b"a" * 1000)
    assert first is not None
    os.rename(spool.directory / first, spool.directory / first.replace(f"-{os.getpid()}-", "-999999999-"))
    mine, _ = spool.put(TARGET, 5, 1, b"b" * 1000)
    _, orphans = spool.put(TARGET, 1, 1, b"c" * 1000)
    assert orphans == 7  # the ended writer's batch went first, and was counted here
    _, orphans = spool.put(TARGET, 1, 1, b"d" * 1000)
    assert orphans == 0  # this process's own batch: marked, and counted by it at exit
    waiting, removed = spool.statuses({str(mine)})
    assert (waiting, removed) == (set(), {mine: spool_module.BOUND})


def test_a_batch_larger_than_the_bound_is_not_written(tmp_path: Path) -> None:
    assert Spool(tmp_path / "spool", 100).put(TARGET, 1, 1, b"x" * 200) == (None, 0)


# --- no credentials in headers (finding 5) -----------------------------------------------


def test_a_password_in_the_endpoint_is_never_written_to_the_spool(spool: Spool) -> None:
    with_password = "http://alice:s3cret-pw@127.0.0.1:9/v1/traces"
    spool.put(Target(with_password, "0", None, None), 1, 1, b"p")
    stored = b"".join(p.read_bytes() for p in spool.directory.iterdir() if p.is_file())
    assert b"s3cret-pw" not in stored and b"alice" not in stored
    (batch,) = taken(spool, with_password)  # still found by the process that has the credentials
    assert batch.target.endpoint == with_password


# --- hostile or broken files (findings 1 and 7) ------------------------------------------


@pytest.mark.parametrize(("content", "why"), [
    (b"", "empty"),
    (b"[" * 60000 + b"\n" + b"x", "not JSON"),  # RecursionError in json, which crashed flush and doctor
    (b"[" * 70000 + b"\n" + b"x", "no header line"),  # longer than a header may be
    (json.dumps({"endpoint": ENDPOINT, "spans": "many", "traces": 1}).encode() + b"\nx", "'spans'"),
    (json.dumps({"endpoint": ENDPOINT, "experiment_id": {"a": 1}, "spans": 1}).encode() + b"\nx",
     "'experiment_id'"),
    (json.dumps({"endpoint": ENDPOINT, "experiment_id": "0\r\nX-Evil: 1", "spans": 1}).encode() + b"\nx",
     "'experiment_id'"),
    (json.dumps({"endpoint": ENDPOINT, "spans": 1, "traces": 1, "bytes": 100}).encode() + b"\nshort",
     "truncated"),
    (json.dumps({"endpoint": ENDPOINT, "spans": 1}).encode(), "no header line"),
])
def test_a_file_that_is_no_readable_batch_is_set_aside_once(spool: Spool, content: bytes, why: str) -> None:
    planted = plant(spool, content)
    assert taken(spool) == []
    assert not planted.exists() and (spool.rejected / planted.name).exists()
    assert why in (spool.rejected / planted.name.replace(".otlp", ".reason.txt")).read_text()
    assert (spool.unreadable, taken(spool), spool.unreadable) == (1, [], 1)  # once
    survey = spool.survey(ENDPOINT)
    assert (survey.batches, survey.unreadable, survey.rejected) == (0, 0, 1)


def test_the_doctors_survey_counts_a_file_that_is_no_batch_and_leaves_it(spool: Spool) -> None:
    planted = plant(spool, b"[" * 60000 + b"\nx")
    survey = spool.survey(ENDPOINT)
    assert (survey.batches, survey.unreadable) == (0, 1) and "not JSON" in survey.first_unreadable
    assert planted.exists()


def test_a_fifo_named_like_a_batch_never_blocks(spool: Spool) -> None:
    spool.directory.mkdir(mode=0o700)
    fifo = spool.directory / "00000000000000000001-1-0000000a.otlp"
    os.mkfifo(fifo)
    assert bounded(lambda: taken(spool)) == []
    assert stat.S_ISFIFO(os.lstat(spool.rejected / fifo.name).st_mode)  # moved, never opened
    assert "not a regular file" in (spool.rejected / fifo.name.replace(".otlp", ".reason.txt")).read_text()


def test_a_symlink_named_like_a_batch_is_not_followed(spool: Spool, tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere.txt"
    secret.write_text(json.dumps({"endpoint": ENDPOINT, "spans": 1}) + "\nsecret payload")
    spool.directory.mkdir(mode=0o700)
    link = spool.directory / "00000000000000000001-1-0000000a.otlp"
    link.symlink_to(secret)
    assert taken(spool) == []  # its target is never sent
    assert (spool.rejected / link.name).is_symlink() and secret.exists()


def test_a_fifo_or_symlink_named_like_an_open_root_never_blocks_and_is_never_sent(spool: Spool,
                                                                                  tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere.txt"
    secret.write_text(json.dumps({"endpoint": ENDPOINT, "spans": 1}) + "\nsecret payload")
    spool.directory.mkdir(mode=0o700)
    os.mkfifo(spool.directory / "00000000000000000001-1-0000000a.open")
    (spool.directory / "00000000000000000002-1-0000000b.open").symlink_to(secret)
    assert bounded(lambda: taken(spool)) == []
    assert secret.read_text().endswith("secret payload")


def test_the_reason_file_is_written_without_following_a_symlink(spool: Spool, tmp_path: Path) -> None:
    """Finding 1: a planted ``rejected/<name>.reason.txt`` symlink made a 404's text overwrite its target."""
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    name, _ = spool.put(TARGET, 1, 1, b"p")
    assert name is not None
    spool.rejected.mkdir(mode=0o700, exist_ok=True)
    (spool.rejected / name.replace(".otlp", ".reason.txt")).symlink_to(victim)
    (batch,) = spool.claim(ENDPOINT)
    spool.reject(batch, "HTTP 404 Not Found")
    assert victim.read_text() == "precious\n"
    assert (spool.rejected / name.replace(".otlp", ".reason.txt")).read_text() == "HTTP 404 Not Found\n"


# --- directories: refused, never chmod-ed (finding 1) ------------------------------------


def refused(step: Callable[[], object]) -> str:
    with pytest.raises(OSError) as caught:
        step()
    line = str(caught.value)
    assert type(caught.value).__name__ == "SpoolRefused", line
    assert "\n" not in line
    return line


def test_a_spool_directory_others_may_write_is_refused_not_chmod_ed(spool: Spool) -> None:
    spool.directory.mkdir()
    os.chmod(spool.directory, 0o1777)
    assert "may be written by other users (mode 1777)" in refused(lambda: spool.put(TARGET, 1, 1, b"p"))
    refused(lambda: list(spool.claim(ENDPOINT)))
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o1777
    assert list(spool.directory.iterdir()) == []


def test_a_symlinked_spool_directory_or_rejected_dir_is_refused_not_chmod_ed(
        spool: Spool, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    spool.directory.symlink_to(elsewhere)
    assert "is a symbolic link" in refused(lambda: spool.put(TARGET, 1, 1, b"p"))
    spool.directory.unlink()
    spool.directory.mkdir(mode=0o700)
    spool.rejected.symlink_to(elsewhere)
    spool.put(TARGET, 1, 1, b"p")
    (batch,) = spool.claim(ENDPOINT)
    assert "is a symbolic link" in refused(lambda: spool.reject(batch, "HTTP 400"))
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755 and list(elsewhere.iterdir()) == []


def test_a_spool_directory_that_is_a_file_is_one_line_not_a_traceback(spool: Spool) -> None:
    spool.directory.write_text("not a directory")
    assert "is not a directory" in refused(lambda: list(spool.claim(ENDPOINT)))
    assert "is not a directory" in refused(lambda: spool.survey(ENDPOINT))


def test_directories_traced_run_makes_are_private_and_its_files_0600(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "a" / "spool", 1 << 20)
    old = os.umask(0)
    try:
        spool.put_rejected(TARGET, 1, 1, b"p", "HTTP 400")
        spool.put(TARGET, 1, 1, b"p")
    finally:
        os.umask(old)
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(spool.rejected.stat().st_mode) == 0o700
    files = [p for p in spool.directory.rglob("*") if p.is_file()]
    assert len(files) == 3 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}


def test_an_existing_private_enough_directory_is_used_as_it_is(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)  # the user's own choice: nobody else can write there
    Spool(directory, 1 << 20).put(TARGET, 1, 1, b"p")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755


# --- another local user (as root: `nobody`) ----------------------------------------------


def test_a_spool_directory_of_another_user_is_refused(spool: Spool, nobody: pwd.struct_passwd) -> None:
    """Finding 1: root's ``flush`` took batches from, and wrote into, a directory another user owns."""
    spool.directory.mkdir(mode=0o700)
    name, _ = spool.put(TARGET, 1, 1, b"planted")
    os.chown(spool.directory, nobody.pw_uid, nobody.pw_gid)
    assert f"belongs to uid {nobody.pw_uid}" in refused(lambda: list(spool.claim(ENDPOINT)))
    refused(lambda: spool.put(TARGET, 1, 1, b"mine"))
    assert [p.name for p in spool.directory.iterdir()] == [name]


def test_the_fallback_in_the_temp_dir_is_private_and_not_a_name_others_can_take(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nobody: pwd.struct_passwd) -> None:
    """Finding 2: with HOME unusable the spool was ``<tmp>/traced-run-<uid>/spool``, which another
    user could make first and fill with batches sent with this user's credentials."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: the home cache is not used
    uid = os.geteuid()
    for planted in (temp / f"traced-run-{uid}" / "spool", temp / f"traced-run-{uid}-aaaaaaaa"):
        planted.mkdir(parents=True)
        os.chmod(planted, 0o777)
        plant(Spool(planted, 1 << 20), json.dumps({"endpoint": ENDPOINT, "spans": 1}).encode() + b"\nevil")
        os.chown(planted, nobody.pw_uid, nobody.pw_gid)
    directory = spool_module.default_directory()
    status = os.lstat(directory)
    assert directory.parent == temp and directory.name.startswith(f"traced-run-{uid}-")
    assert status.st_uid == uid and stat.S_IMODE(status.st_mode) == 0o700 and list(directory.iterdir()) == []
    assert spool_module.default_directory() == directory  # the next process finds the same one


# --- nothing blocks the spool (issue 24) ---------------------------------------------------


def backdated(spool: Spool, name: str, seconds: float, writer: int) -> str:
    """Batch ``name`` as if process ``writer`` wrote it ``seconds`` ago: the name holds both,
    and the file's time says so too."""
    entry = spool_module.parse(name)
    assert entry is not None
    old = f"{int((entry.written - seconds) * 1e9):020d}-{writer}-{name.rsplit('-', 1)[1]}"
    os.rename(spool.directory / name, spool.directory / old)
    os.utime(spool.directory / old, (entry.written - seconds, entry.written - seconds))
    return old


def ended_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_a_claim_given_back_does_not_make_a_batch_younger(tmp_path: Path) -> None:
    """A flush that stopped at the oldest batch moved its time past its lease: later, the
    batches behind it expired while it stayed, for ever."""
    writer = ended_pid()
    flushed = Spool(tmp_path / "spool", 1 << 20, max_age=3600)
    names = [backdated(flushed, str(flushed.put(TARGET, 2, 1, bytes([i]))[0]), 3000, writer)
             for i in range(2)]
    held = next(flushed.claim(ENDPOINT))
    assert held.name == names[0]
    flushed.release(held)  # MLflow did not take it
    later = Spool(tmp_path / "spool", 1 << 20, max_age=1800)  # as if 20 minutes later, with 3600
    assert taken(later) == [] and (later.expired, later.expired_spans) == (2, 4)
    assert list(later.directory.glob("*.otlp*")) == []


@pytest.mark.parametrize(("field", "value"), [
    ("experiment_id", "\u0661\u0662"),  # Arabic-Indic digits: no number to MLflow
    ("experiment_id", " 12"),
    ("run_id", "run\u20ac1"),  # not Latin-1: http.client cannot put it in a header
    ("workspace", "Team A"),
])
def test_a_batch_whose_header_cannot_be_sent_is_set_aside_and_the_next_goes(
        spool: Spool, field: str, value: str) -> None:
    header = {"endpoint": ENDPOINT, "experiment_id": "0", "spans": 1, "traces": 1, "bytes": 1, field: value}
    planted = plant(spool, json.dumps(header).encode() + b"\nx")
    later, _ = spool.put(TARGET, 1, 1, b"later")
    assert [batch.name for batch in taken(spool)] == [later]
    reason = (spool.rejected / planted.name.replace(".otlp", ".reason.txt")).read_text()
    assert f"header field {field!r} cannot be sent: expected" in reason, reason


def test_put_back_set_aside_sends_them_again_and_leaves_what_is_no_batch(spool: Spool) -> None:
    name, _ = spool.put(TARGET, 3, 1, b"refused once")
    (batch,) = spool.claim(ENDPOINT)
    spool.reject(batch, "experiment 'x' is deleted in MLflow")
    spool.rejected.joinpath("00000000000000000001-1-0000000b.otlp").write_bytes(b"not a batch")
    assert spool.put_back_set_aside() == 1
    (again,) = taken(spool)
    assert (again.payload, again.spans) == (b"refused once", 3) and again.name != name
    assert sorted(p.name for p in spool.rejected.iterdir()) == ["00000000000000000001-1-0000000b.otlp"]
    assert spool.put_back_set_aside() == 0


def test_a_removal_mark_of_a_writer_that_never_ends_goes_after_max_age(tmp_path: Path) -> None:
    """Pid 1 (the app in a container) is alive to every later process: its marks stayed for ever."""
    spool = Spool(tmp_path / "spool", 1 << 20, max_age=3600)
    spool.put(TARGET, 1, 1, b"p")
    marks = [spool.directory / f"0000000000000000000{n}-1-0000000a.dropped" for n in (1, 2)]
    for mark in marks:
        mark.touch()
    then = time.time() - 7200
    os.utime(marks[0], (then, then))
    taken(spool)
    assert [mark.exists() for mark in marks] == [False, True]


def test_a_batch_past_max_age_goes_though_its_writer_runs_and_the_writer_is_told(tmp_path: Path) -> None:
    """A writer whose pid is alive to everyone (1, in a container) kept its batches for ever."""
    writer = Spool(tmp_path / "spool", 1 << 20, max_age=3600)
    mine = backdated(writer, str(writer.put(TARGET, 3, 1, b"old")[0]), 7200, os.getpid())
    other = Spool(tmp_path / "spool", 1 << 20, max_age=3600)
    assert taken(other) == [] and other.survey(ENDPOINT).batches == 0
    assert other.expired == 0  # its writer counts it in its exit line: it still runs ...
    assert (other.expired_told.batches, other.expired_told.spans) == (1, 3)  # ... and flush says it went
    assert writer.statuses({mine}) == (set(), {mine: spool_module.AGE})
    assert list(writer.directory.iterdir()) == []  # the mark went once read
