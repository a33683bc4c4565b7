"""Claims are exclusive: a claim is a lock the kernel lets go of when its
claimer dies, given back only then, never because the batch or the claim is
old, nor kept by a forked child; and a spool operation on a file another
process moved does not fail. An open root's record is held the same way: sent
only once its holder has died."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from traced_run.delivery.spool import Batch, Spool, Target

ENDPOINT = "http://127.0.0.1:9/v1/traces"
TARGET = Target(ENDPOINT, "0", None, None)
HOUR = 3600.0


def old_batch(spool: Spool) -> str:
    """A batch written an hour ago, while MLflow was down: its name holds when it was written."""
    name, _ = spool.put(TARGET, 1, 1, b"payload")
    assert name is not None
    old = f"{int((time.time() - HOUR) * 1e9):020d}{name[20:]}"
    os.rename(spool.directory / name, spool.directory / old)
    return old


def test_an_old_batch_claimed_by_a_live_process_is_not_claimed_again(tmp_path: Path) -> None:
    first, second = Spool(tmp_path / "spool", 1 << 20), Spool(tmp_path / "spool", 1 << 20)
    name = old_batch(first)
    (held,) = first.claim(ENDPOINT)
    assert held.name == name
    assert list(second.claim(ENDPOINT)) == [], "a second flusher took a batch the first one is sending"
    first.reject(held, "HTTP 400: bad span")  # and the first one's answer finds its file
    assert (first.rejected / name).read_bytes().endswith(b"payload")


CLAIMER = """
import sys
from pathlib import Path
from traced_run.delivery.spool import Spool

(held,) = Spool(Path(sys.argv[1]), 1 << 20).claim(sys.argv[2])
print(held.name, flush=True)
sys.stdin.read()  # posting, for as long as the test wants
"""


def test_a_claim_is_held_while_its_claimer_lives_however_long_and_given_back_when_it_dies(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    name = old_batch(spool)
    claimer = subprocess.Popen([sys.executable, "-c", CLAIMER, str(spool.directory), ENDPOINT],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert claimer.stdout is not None and claimer.stdout.readline().strip() == name
        (claimed,) = spool.directory.glob("*.claimed-*")
        os.utime(claimed, (0, 0))  # no lease: however long its post takes, it is its claimer's
        assert list(spool.claim(ENDPOINT)) == []
    finally:
        claimer.kill()
        claimer.wait()
    assert [batch.name for batch in taken(spool)] == [name]


def test_a_claim_named_for_a_pid_that_is_always_alive_but_held_by_nobody_is_given_back(
        tmp_path: Path) -> None:
    """Pid 1 (the app in a container) is alive to every process: its claims were never given back."""
    spool = Spool(tmp_path / "spool", 1 << 20)
    name = old_batch(spool)
    os.rename(spool.directory / name, spool.directory / f"{name}.claimed-1")
    lease_end = time.time() + HOUR  # as a lease, which pid 1 never outlived, would have it
    os.utime(spool.directory / f"{name}.claimed-1", (lease_end, lease_end))
    assert [batch.name for batch in taken(spool)] == [name]


def test_a_forked_child_does_not_keep_its_parents_claim(tmp_path: Path) -> None:
    first, second = Spool(tmp_path / "spool", 1 << 20), Spool(tmp_path / "spool", 1 << 20)
    name = old_batch(first)
    (held,) = first.claim(ENDPOINT)
    started, start = os.pipe()
    ended, end = os.pipe()
    child = os.fork()
    if child == 0:  # a child that lives on (a worker of a pre-forking server) until its parent ends
        first.let_go_inherited()
        os.close(start)  # the parent's read sees the end of the pipe: the child is past its start
        os.close(end)
        os.read(ended, 1)
        os._exit(0)
    os.close(start)
    os.close(ended)
    try:
        assert os.read(started, 1) == b""
        first.release(held)
        assert [batch.name for batch in taken(second)] == [name]
    finally:
        os.close(end)
        os.close(started)
        os.waitpid(child, 0)


HOLDER = """
import sys
from pathlib import Path
from traced_run.delivery.spool import Spool, Target

held = Spool(Path(sys.argv[1]), 1 << 20).hold_open(Target(sys.argv[2], "0", None, None), b"root")
print(held.name, flush=True)
sys.stdin.read()  # the run goes on, for as long as the test wants
"""


def test_an_open_root_is_sent_only_once_the_process_holding_it_has_died(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(spool.directory), ENDPOINT],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        record = holder.stdout.readline().strip()
        assert record.endswith(".open")
        assert taken(spool) == [], "a root its process still runs was sent"
        assert (spool.directory / record).exists()
    finally:
        holder.kill()  # SIGKILL: no code of the holder's runs
        holder.wait()
    (batch,) = taken(spool)
    assert (batch.name, batch.spans, batch.traces, batch.payload) == (record.replace(".open", ".otlp"), 1, 1,
                                                                      b"root")
    assert list(spool.directory.iterdir()) == []


def test_an_open_root_written_again_or_let_go_by_its_own_process_is_never_sent(tmp_path: Path) -> None:
    mine, other = Spool(tmp_path / "spool", 1 << 20), Spool(tmp_path / "spool", 1 << 20)
    held = mine.hold_open(TARGET, b"root ended at 1")
    later = mine.hold_open(TARGET, b"root ended at 2", held)
    assert later.name == held.name and [p.name for p in mine.directory.iterdir()] == [held.name]
    assert taken(other) == [], "another spool object of the same process took a record it holds"
    assert (mine.directory / held.name).read_bytes().endswith(b"root ended at 2")
    mine.let_go_open(later)  # the real root left: its record goes
    assert list(mine.directory.iterdir()) == [] and taken(other) == []


def taken(spool: Spool) -> list[Batch]:
    batches = list(spool.claim(ENDPOINT))
    for batch in batches:
        spool.done(batch)
    return batches


def test_every_operation_on_a_batch_another_process_moved_goes_through(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    old_batch(spool)
    old_batch(spool)
    done, rejected = spool.claim(ENDPOINT)
    for batch in (done, rejected):
        os.unlink(batch.path)  # the directory changed under this process
    spool.done(done)
    spool.release(done)
    aside = spool.reject(rejected, "HTTP 400")
    assert aside.read_bytes().endswith(b"payload")
    assert spool.survey(ENDPOINT).unreadable == 0
