"""Claims are exclusive: a claim is given back only when its claimer is gone
(dead, or past its lease), never because the batch is old; and a spool
operation on a file another process moved does not fail."""

from __future__ import annotations

import os
import time
from pathlib import Path

from traced_run.delivery.spool import Spool, Target

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


def test_a_claim_whose_lease_ran_out_is_given_back(tmp_path: Path) -> None:
    first, second = Spool(tmp_path / "spool", 1 << 20, lease=HOUR), Spool(tmp_path / "spool", 1 << 20)
    name = old_batch(first)
    (held,) = first.claim(ENDPOINT)
    os.utime(held.path, (time.time() - 1, time.time() - 1))  # an hour later: the claimer hangs
    assert [b.name for b in second.claim(ENDPOINT)] == [name]


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
