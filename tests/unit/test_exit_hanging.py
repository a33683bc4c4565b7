"""Leaving a hanging MLflow, in-process, against a fake sender: what the process
has learnt of MLflow decides how long its exit waits. A post that went
unanswered for its whole timeout, or one in flight for the whole exit bound
while MLflow has answered none, means MLflow hangs: the exit spools what is
left at once. A post sent at exit (nothing learnt yet) gets the bound; a
healthy MLflow gets the last batch."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from support.fakes import (
    DEADLINE,
    REFUSED,
    Clock,
    FakeSender,
    settings,
    submit_together,
    trace,
    turn_ends_with,
)

from traced_run.delivery import Delivery
from traced_run.delivery.export import DELIVERED, Outcome
from traced_run.delivery.sender import Backoff
from traced_run.delivery.spool import Spool

ENDPOINT = "http://127.0.0.1:9/v1/traces"
TIMED_OUT = Outcome(False, False, "no answer within 10.0 s")
"""What a post MLflow left unanswered for its whole timeout ends with (transport's words)."""
EXIT_TIMEOUT = 2.0
LONG_EXIT = 60.0
"""The exit bound where a test tells "at once" from "waited for the bound" by the real clock."""
AT_ONCE = LONG_EXIT / 2
"""Most an exit that does not wait for MLflow may take: an exit that waits takes all of
LONG_EXIT, one that does not takes well under a second, even on a loaded 2-core machine."""
POST_TIMEOUT = 60.0
"""A post's own timeout, which the exit must never wait out: the exit bound is 2 s."""


def test_what_the_backoff_knows_of_a_hanging_mlflow() -> None:
    clock = Clock()
    backoff = Backoff(clock)
    assert backoff.hanging(EXIT_TIMEOUT) is None
    backoff.heard(TIMED_OUT)
    assert backoff.hanging(EXIT_TIMEOUT) == "no answer within 10.0 s"
    backoff.heard(DELIVERED)
    assert backoff.hanging(EXIT_TIMEOUT) is None
    with backoff.asking():  # MLflow answers, if slowly: a post in flight is not taken for a hang
        clock.now += 10 * EXIT_TIMEOUT
        assert backoff.hanging(EXIT_TIMEOUT) is None
    backoff.heard(TIMED_OUT)
    backoff.heard(REFUSED)  # refused at once: it no longer hangs, nor has it answered
    assert backoff.hanging(EXIT_TIMEOUT) is None
    with backoff.asking():
        clock.now += 1.5
        assert backoff.hanging(EXIT_TIMEOUT) is None
        assert backoff.patience_left(EXIT_TIMEOUT) == pytest.approx(0.5)
        clock.now += 0.5
        assert backoff.hanging(EXIT_TIMEOUT) == "no answer from MLflow within 2.0 s"
    assert backoff.hanging(EXIT_TIMEOUT) is None and backoff.patience_left(EXIT_TIMEOUT) is None


def close_timed(delivery: Delivery) -> float:
    started = time.monotonic()
    delivery.close("process exit")
    return time.monotonic() - started


def test_after_a_post_that_timed_out_the_exit_does_not_wait(
        tmp_path: Path, sender: type[FakeSender], capfd: pytest.CaptureFixture[str]) -> None:
    sender.reset(TIMED_OUT, gated=True)
    sender.release.release()  # the first post ends at once, unanswered; every later one hangs
    delivery = Delivery(settings(tmp_path, exit_timeout=LONG_EXIT))
    submit_together(delivery, trace(1, 3))
    delivery.flush(0)
    assert sender.posted.acquire(timeout=DEADLINE)
    submit_together(delivery, trace(2, 2))
    delivery.flush(0)
    assert sender.posted.acquire(timeout=DEADLINE), "no second post"  # it hangs
    elapsed = close_timed(delivery)
    said = capfd.readouterr().err
    assert elapsed < AT_ONCE, f"the exit waited {elapsed:.2f}s for a hanging MLflow"
    assert f"5 spans of 2 traces sent to {ENDPOINT}: no answer within 10.0 s; kept in" in said, said
    assert len(said.splitlines()) == 1, said


def test_a_post_in_flight_for_the_whole_exit_bound_is_not_waited_for(
        tmp_path: Path, sender: type[FakeSender], capfd: pytest.CaptureFixture[str], clock: Clock) -> None:
    sender.reset(DELIVERED, gated=True)
    delivery = Delivery(settings(tmp_path, exit_timeout=LONG_EXIT), clock=clock)
    submit_together(delivery, trace(1, 3))
    delivery.flush(0)
    assert sender.posted.acquire(timeout=DEADLINE)
    clock.now += LONG_EXIT  # MLflow has left the post unanswered for the whole exit bound
    elapsed = close_timed(delivery)
    said = capfd.readouterr().err
    assert elapsed < AT_ONCE, f"the exit waited {elapsed:.2f}s for a post MLflow leaves unanswered"
    # Sent, so MLflow may have it: not "not delivered".
    assert f"3 spans of 1 trace sent to {ENDPOINT}: no answer within " in said, said
    assert "MLflow may already have stored them, re-sending is safe" in said, said
    assert Spool.of(settings(tmp_path)).survey(ENDPOINT).spans == 3


def test_a_slow_post_begun_long_before_the_exit_gets_only_the_bound(
        tmp_path: Path, sender: type[FakeSender], capfd: pytest.CaptureFixture[str], clock: Clock) -> None:
    """MLflow answered the last post (slow, not hanging); the one in flight began more than
    the exit bound before the exit and is still unanswered: the exit waits what is left of
    its bound, not for the post's own timeout, and keeps the batch."""
    sender.reset(DELIVERED, gated=True)
    delivery = Delivery(settings(tmp_path, exit_timeout=EXIT_TIMEOUT, timeout=POST_TIMEOUT), clock=clock)
    submit_together(delivery, trace(1, 3))
    delivery.flush(0)
    assert sender.posted.acquire(timeout=DEADLINE)
    sender.release.release()
    assert delivery.flush(DEADLINE)
    submit_together(delivery, trace(2, 2))
    # Flushed, it goes at once (a batch's delay never runs out while the test's clock stands still).
    threading.Thread(target=delivery.flush, args=(DEADLINE,), daemon=True).start()
    assert sender.posted.acquire(timeout=DEADLINE)
    clock.now += 2 * EXIT_TIMEOUT
    elapsed = close_timed(delivery)
    said = capfd.readouterr().err
    # What is left of the 2 s bound, not the post: it ends with its own timeout (60 s) or the test.
    assert elapsed < POST_TIMEOUT / 2, f"the exit waited {elapsed:.2f}s for a slow post"
    assert f"2 spans of 1 trace sent to {ENDPOINT}: no answer within " in said, said
    assert "(exit_timeout=2s reached while MLflow was still taking batches" in said, said
    assert Spool.of(settings(tmp_path)).survey(ENDPOINT).spans == 2


def test_a_post_sent_at_exit_gets_the_bound_and_a_healthy_mlflow_the_last_batch(
        tmp_path: Path, sender: type[FakeSender], capfd: pytest.CaptureFixture[str], clock: Clock) -> None:
    """The process knew nothing of MLflow: its first post is the exit's. MLflow
    answers it late in the bound, once the exit has begun: delivered, nothing spooled."""
    sender.reset(DELIVERED, gated=True)
    delivery = Delivery(settings(tmp_path, exit_timeout=LONG_EXIT), clock=clock)
    leaving = threading.Event()
    delivery.interrupt = lambda why: leaving.set()  # the first thing close() does
    answered = threading.Event()

    def answer() -> None:
        if sender.posted.acquire(timeout=DEADLINE) and leaving.wait(DEADLINE):
            clock.now += LONG_EXIT - 1  # MLflow takes most of the bound to answer
            answered.set()
            sender.release.release()

    answering = threading.Thread(target=answer, daemon=True)
    answering.start()
    submit_together(delivery, trace(1, 3))
    delivery.close("process exit")
    answering.join(DEADLINE)
    assert answered.is_set(), "the post was not answered while the exit waited"
    assert len(sender.posts) == 1
    # Waiting past the bound, or giving up before MLflow answered, would have spooled the batch and
    # said so.
    assert capfd.readouterr().err == ""
    assert Spool.of(settings(tmp_path)).survey(ENDPOINT).spans == 0


def test_an_mlflow_that_hung_and_answers_again_gets_the_last_batch(
        tmp_path: Path, sender: type[FakeSender], capfd: pytest.CaptureFixture[str]) -> None:
    sender.reset(TIMED_OUT, DELIVERED)
    delivery = Delivery(settings(tmp_path, exit_timeout=EXIT_TIMEOUT))
    submit_together(delivery, trace(1, 3))
    assert delivery.flush(DEADLINE)  # unanswered, spooled; sent again once the back-off is over
    spool = Spool.of(settings(tmp_path))
    sent_again = turn_ends_with(delivery, lambda: not spool.survey(ENDPOINT).spans)
    assert sent_again, "the spooled batch was not sent again"
    submit_together(delivery, trace(2, 2))  # the last batch, queued at exit
    delivery.close("process exit")
    assert len(sender.posts) == 3
    assert spool.survey(ENDPOINT).spans == 0, "a healthy MLflow's last batch was spooled"
    said = capfd.readouterr().err.strip()
    assert said.startswith("traced-run: 3 spans were spooled while") and said.endswith("and sent later"), said
