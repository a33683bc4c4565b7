"""close() against a post's late answer, forced: the delivery thread's post
is held until close() has kept the batch, then answered. Before 3182b9c the
thread then set the batch aside as well (so it was kept and rejected, and
sent twice); now the answer to a batch close() took over is not the thread's."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from support.fakes import DEADLINE, NOT_FOUND, FakeSender, delivery_threads, settings, submit_together, trace

from traced_run.delivery import Delivery
from traced_run.delivery.spool import Spool


def test_a_late_answer_to_a_batch_close_kept_is_not_handled_again(
        tmp_path: Path, sender: type[FakeSender], capfd: pytest.CaptureFixture[str]) -> None:
    sender.reset(NOT_FOUND, gated=True)
    before = set(threading.enumerate())
    delivery = Delivery(settings(tmp_path, exit_timeout=0.6))
    submit_together(delivery, trace(1, 3))
    delivery.flush(0)  # the batch is due now
    assert sender.posted.acquire(timeout=DEADLINE), "the delivery thread never posted"

    delivery.close("process exit")  # the post hangs past the exit bound: close() keeps the batch
    sender.release.release()  # now MLflow answers, too late
    threads = delivery_threads(before)
    for thread in threads:
        thread.join(timeout=DEADLINE)

    spool = Spool.of(settings(tmp_path))
    assert not spool.rejected.exists() or not any(spool.rejected.iterdir()), "kept and set aside both"
    assert len(sender.posts) == 1, "the kept batch was sent again by the closed process"
    assert spool.survey("http://127.0.0.1:9/v1/traces").spans == 3
    assert not any(thread.is_alive() for thread in threads), "the delivery thread went on after close()"
    said = capfd.readouterr().err
    assert "rejected" not in said, said
    assert "3 spans of 1 trace sent to http://127.0.0.1:9/v1/traces: no answer within " in said, said
