"""The parts of delivery, in-process: the queue's batching, the back-off, the
spill to disk and the delivery thread against a fake sender (fake clock,
``tmp_path`` spool). Each runs in well under a second."""

from __future__ import annotations

import itertools
import threading
from collections import deque
from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext
from support.fakes import (
    DEADLINE,
    REFUSED,
    Clock,
    FakeSender,
    ended,
    run,
    settings,
    span,
    submit_together,
    trace,
    turn_ends_with,
)

from traced_run.delivery import Delivery
from traced_run.delivery import queue as span_queue
from traced_run.delivery.export import DELIVERED, Outcome, encode
from traced_run.delivery.open_roots import MAX_KEPT, OpenRoots
from traced_run.delivery.queue import SpanQueue, whole_traces
from traced_run.delivery.sender import BACKOFF, Backoff
from traced_run.delivery.spill import OverflowSpooler, SpoolWriter
from traced_run.delivery.spool import Spool
from traced_run.delivery.stats import DeliveryStats

ENDPOINT = "http://127.0.0.1:9/v1/traces"


def trace_ids(spans: list) -> list[int]:  # type: ignore[type-arg]
    return [s.context.trace_id for s in spans]


# --- the queue's batching ------------------------------------------------------------------
def test_a_short_queue_goes_whole() -> None:
    queue = deque(trace(1, 3) + trace(2, 2))
    assert trace_ids(whole_traces(queue, 512)) == [1, 1, 1, 2, 2]
    assert not queue


def test_a_batch_holds_whole_traces_and_never_splits_one_that_fits() -> None:
    # Spans of three traces interleaved, as concurrent runs end them.
    queue = deque([span(1, 0), span(2, 0), span(1, 1), span(3, 0), span(2, 1), span(1, 2), span(3, 1)])
    taken = whole_traces(queue, 5)
    assert sorted(trace_ids(taken)) == [1, 1, 1, 2, 2]
    assert trace_ids(list(queue)) == [3, 3]


def test_a_later_smaller_trace_fills_the_room_a_larger_one_leaves() -> None:
    queue = deque(trace(1, 3) + trace(2, 4) + trace(3, 2))
    assert trace_ids(whole_traces(queue, 5)) == [1, 1, 1, 3, 3]
    assert trace_ids(list(queue)) == [2, 2, 2, 2]


def test_a_trace_larger_than_a_batch_is_cut() -> None:
    queue = deque(trace(1, 7) + trace(2, 1))
    assert trace_ids(whole_traces(queue, 5)) == [1] * 5
    assert trace_ids(list(queue)) == [1, 1, 2]


def open_queue(tmp_path: Path, clock: Clock | None = None) -> SpanQueue:
    keep, _, _ = spool_writer(tmp_path, 1 << 20)
    return SpanQueue(2048, OverflowSpooler(keep, 512), lambda: None, clock=clock or Clock())


def test_a_run_goes_in_one_batch_once_its_root_has_ended(tmp_path: Path) -> None:
    queue = open_queue(tmp_path)
    first, second = run(1, 3), run(2, 1)
    for one in [*first[:2], *second]:  # run 2 ended while run 1 is still going
        queue.put(one)
    assert trace_ids(queue.take(0) or []) == [2, 2]
    queue.done()
    assert queue.take(0) == [], "the open run's ended spans went before its root"
    queue.done()
    for one in first[2:]:
        queue.put(one)
    assert trace_ids(queue.take(0) or []) == [1] * 4


def test_an_open_run_s_spans_go_after_a_bounded_wait(tmp_path: Path) -> None:
    clock = Clock()
    queue = open_queue(tmp_path, clock)
    for one in run(1, 3)[:2]:
        queue.put(one)
    assert queue.take(0) == []
    queue.done()
    clock.now += span_queue.OPEN_TRACE_WAIT
    assert trace_ids(queue.take(0) or []) == [1, 1]


@pytest.mark.parametrize("why", ["flush", "exit", "sigterm", "full batch"])
def test_everything_goes_when_asked_leaving_or_a_batch_is_full(tmp_path: Path, why: str) -> None:
    queue = open_queue(tmp_path)
    spans = [s for n in range(1, 200) for s in run(n, 3)[:3]] if why == "full batch" else run(1, 3)[:3]
    for one in spans:
        queue.put(one)
    if why == "exit":
        queue.begin_closing(5)
    elif why == "sigterm":
        queue.cut_off = True
    elif why == "flush":
        threading.Thread(target=queue.flush, args=(5,), daemon=True).start()
    taken = queue.take(5) or []
    assert len(taken) == (510 if why == "full batch" else 3), why  # 170 whole runs fill a batch


# --- the back-off ---------------------------------------------------------------------------
def test_backoff_grows_to_a_short_cap_and_resets_when_mlflow_takes_a_batch() -> None:
    clock = Clock()
    backoff = Backoff(clock)
    waits = []
    for _ in range(6):
        backoff.failed()
        waits.append(backoff.remaining())
        assert backoff.down()
        clock.now += backoff.remaining()
        assert not backoff.down()
    assert waits == [*BACKOFF, BACKOFF[-1], BACKOFF[-1], BACKOFF[-1]]
    # While MLflow is down, at most one attempt a second; it is found again within a second.
    assert max(BACKOFF) <= 1.0
    backoff.up()
    backoff.failed()
    assert backoff.remaining() == BACKOFF[0]


def test_an_outage_is_told_once_it_lasted_long_enough() -> None:
    clock = Clock()
    backoff = Backoff(clock)
    backoff.failed()
    assert backoff.outage(10.0) is None
    clock.now += 10.0
    backoff.failed()
    assert backoff.outage(10.0) is not None
    backoff.up()
    assert backoff.outage(0.0) is None


def test_leaving_retries_at_once() -> None:
    backoff = Backoff(Clock())
    backoff.failed()
    backoff.retry_now()
    assert not backoff.down()


def test_mlflow_is_not_asked_again_before_the_time_its_retry_after_named() -> None:
    clock = Clock()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    backoff = Backoff(clock, sleep)
    backoff.failed(retry_after=30.0)
    assert backoff.remaining() == 30.0  # not the 0.25 s back-off
    backoff.retry_now()  # leaving does not cut a wait MLflow asked for
    assert backoff.remaining() == 30.0
    assert not backoff.wait_asked(within=5.0)  # beyond the exit bound: no wait, the batch is kept
    assert slept == []
    clock.now += 27.0
    assert backoff.wait_asked(within=5.0)  # ends within it: waited out, then MLflow is asked
    assert slept == [3.0] and not backoff.down()
    backoff.failed(retry_after=0.1)  # shorter than the back-off: the back-off holds
    assert backoff.remaining() == BACKOFF[1]
    backoff.up()
    backoff.retry_now()
    assert not backoff.down()


# --- the spill to disk ----------------------------------------------------------------------
def test_a_trace_that_leaves_before_its_root_keeps_the_root_in_the_spool_until_the_root_leaves(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1 << 20)
    *children, root = run(7, 2)
    open_now = {7: root}  # as the selection says while the run goes on
    roots = OpenRoots(settings(tmp_path), spool, open_now.get)
    roots.leaving(children[:1])
    roots.leaving(children[1:])  # written again, with a later end: still one record
    (record,) = spool.directory.glob("*.open")
    assert list(spool.claim(ENDPOINT)) == [], "a record this process holds is not sent"
    assert record.read_bytes().endswith(encode([root], settings(tmp_path)))
    del open_now[7]
    roots.leaving([root])
    assert list(spool.directory.iterdir()) == []


def test_open_roots_kept_at_once_are_bounded(tmp_path: Path) -> None:
    """Each kept root holds a file descriptor of the app's: a server with many long-open traces
    keeps only the first MAX_KEPT, and a kept one that ends makes room."""
    spool = Spool(tmp_path / "spool", 1 << 20)
    runs = {n: run(n, 1) for n in range(1, MAX_KEPT + 3)}
    open_now = {n: spans[-1] for n, spans in runs.items()}
    roots = OpenRoots(settings(tmp_path), spool, open_now.get)
    for spans in runs.values():
        roots.leaving(spans[:1])
    assert len(list(spool.directory.glob("*.open"))) == MAX_KEPT
    del open_now[1]
    roots.leaving(runs[1][1:])  # the first run's root leaves: its record goes
    roots.leaving(runs[MAX_KEPT + 2][:1])  # a later open trace now finds room
    assert len(list(spool.directory.glob("*.open"))) == MAX_KEPT


def spool_writer(tmp_path: Path, max_bytes: int) -> tuple[SpoolWriter, DeliveryStats, Spool]:
    config = settings(tmp_path)
    spool = Spool(tmp_path / "spool", max_bytes)
    stats = DeliveryStats(config, spool)
    return (SpoolWriter(config, spool, stats, lambda: None, OpenRoots(config, spool, lambda trace: None)),
            stats, spool)


def test_kept_batches_are_counted_as_this_processs_own(tmp_path: Path) -> None:
    keep, stats, spool = spool_writer(tmp_path, 1 << 20)
    keep.keep(trace(1, 2) + trace(2, 3))
    assert spool.survey(ENDPOINT).spans == 5
    assert stats.exit_line(ENDPOINT) == (
        f"5 spans of 2 traces not delivered to {ENDPOINT} (the queue ran past half of queue_size=2048): "
        f"kept in {spool.directory}; the next traced process or `traced-run flush` sends them")


def test_a_queue_that_ran_past_half_says_mlflow_fell_behind_not_that_it_was_unreachable(
        tmp_path: Path) -> None:
    keep, stats, spool = spool_writer(tmp_path, 1 << 20)
    keep.keep(trace(1, 2))
    for batch in spool.claim(ENDPOINT):  # another process sent it
        spool.done(batch)
    assert stats.exit_line(ENDPOINT) == (f"2 spans were spooled while {ENDPOINT} fell behind (the queue ran "
                                          "past half of queue_size=2048) and sent later")


def test_a_running_processs_batch_removed_for_its_age_is_in_its_exit_line(tmp_path: Path) -> None:
    keep, stats, spool = spool_writer(tmp_path, 1 << 20)
    keep.keep(trace(1, 3))
    other = Spool(spool.directory, 1 << 20, max_age=0)  # to it, every batch is past its max age
    assert list(other.claim(ENDPOINT)) == [] and other.expired == 0  # its writer runs: it counts it
    assert stats.exit_line(ENDPOINT) == ("3 spans spooled more than spool_max_age=7 d ago were removed from "
                                          "the spool")


def test_a_batch_larger_than_the_bound_is_kept_in_parts_cut_between_traces(tmp_path: Path) -> None:
    spans = [s for n in range(1, 7) for s in trace(n, 4)]
    one_trace = len(encode(trace(1, 4), settings(tmp_path)))
    keep, _, spool = spool_writer(tmp_path, 4096 + 3 * one_trace)
    keep.keep(spans)
    batches = list(spool.claim(ENDPOINT))
    assert len(batches) > 1
    assert sum(b.spans for b in batches) == 24
    assert all(b.spans % 4 == 0 and b.traces == b.spans // 4 for b in batches), [b.spans for b in batches]


# --- the delivery thread, against a fake sender --------------------------------------------
def test_a_batch_mlflow_does_not_take_is_spooled_and_sent_again_when_it_is_back(
        tmp_path: Path, sender: type[FakeSender], capfd: pytest.CaptureFixture[str]) -> None:
    sender.reset(REFUSED, REFUSED, DELIVERED)
    delivery = Delivery(settings(tmp_path))
    delivery.start()
    submit_together(delivery, trace(1, 3))
    assert delivery.flush(DEADLINE)
    spool = Spool.of(settings(tmp_path))
    sent_again = turn_ends_with(delivery, lambda: not spool.survey(ENDPOINT).spans)
    assert sent_again, "the spooled batch was not sent again"
    assert len(sender.posts) == 3  # refused, refused (from the spool), then taken
    delivery.close()
    said = capfd.readouterr().err.strip()
    assert said.startswith("traced-run: 3 spans were spooled while") and said.endswith("and sent later"), said


def test_under_steady_traffic_the_spool_is_sent_again_while_the_app_runs(
        tmp_path: Path, sender: type[FakeSender], clock: Clock) -> None:
    """A run ends between each move of the test's clock, and goes at once: the queue is never
    idle for a batch's delay (which never runs out while the clock stands still), so what was
    spooled in the outage goes only by the spool's turn after each batch MLflow takes."""
    down = True
    delivered: list[bytes] = []

    def mlflow(payload: bytes) -> Outcome:
        if down:
            return REFUSED
        delivered.append(payload)
        return DELIVERED

    sender.judge = mlflow
    delivery = Delivery(settings(tmp_path), clock=clock)
    spool = Spool.of(settings(tmp_path))
    for n in range(1, 5):
        down = n < 4  # the first three runs are spooled; MLflow is back for the fourth
        with delivery._queue.lock:  # the run ends as its back-off is over
            clock.now += max(BACKOFF) + 1
            for s in trace(n, 2):
                delivery.submit(s)
        assert delivery.flush(DEADLINE)
    sent_again = turn_ends_with(delivery, lambda: not spool.survey(ENDPOINT).spans)
    assert sent_again, "what was spooled in the outage waits for the exit"
    delivery.close()
    ended(delivery, clock)
    assert len(delivered) == 4, "a batch was sent twice"


def test_while_mlflow_is_down_attempts_are_few(
        tmp_path: Path, sender: type[FakeSender], clock: Clock) -> None:
    asked: list[float] = []

    def refuse(payload: bytes) -> Outcome:
        asked.append(clock())
        return REFUSED

    sender.judge = refuse
    delivery = Delivery(settings(tmp_path, exit_timeout=0.3), clock=clock)
    for n in range(1, 13):  # a run ends every 1/8 s of the test's clock, for 1.5 s
        with delivery._queue.lock:
            clock.now += 0.125
            for s in trace(n, 2):
                delivery.submit(s)
        assert delivery.flush(DEADLINE)
    running = list(asked)
    delivery.close()
    ended(delivery, clock)
    # One attempt, then one each back-off later (0.25, then 0.5 s); the next is due after 1 s, past
    # the end. Every other run's batch went to the spool without asking.
    assert [later - earlier for earlier, later in itertools.pairwise(running)] == list(BACKOFF[:2]), running
    assert Spool.of(settings(tmp_path)).survey(ENDPOINT).spans == 24


def test_a_full_queue_spills_to_disk_rather_than_drop(tmp_path: Path, sender: type[FakeSender],
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    sender.reset(REFUSED, gated=True)  # the one post hangs: the delivery thread is held
    delivery = Delivery(settings(tmp_path, queue_size=600, exit_timeout=0.5))
    delivery.start()
    delivery.submit(span(1000, 0))
    delivery.flush(0)
    assert sender.posted.acquire(timeout=10)
    for n in range(1, 301):
        for s in trace(n, 4):
            delivery.submit(s)
    delivery.close()
    said = capfd.readouterr().err
    assert "dropped" not in said, said
    assert "1200 spans of 300 traces not delivered" in said, said
    assert f"1 span of 1 trace sent to {ENDPOINT}: no answer within " in said, said


# --- a span that cannot be encoded ----------------------------------------------------------
def unencodable(trace_id: int) -> ReadableSpan:
    """A span no encoder takes: a value nested past Python's recursion limit (what a library
    may still hand over after enrich bounded what it knows of)."""
    nested: list[object] = []
    for _ in range(5000):
        nested = [nested]
    return ReadableSpan("bad step", context=SpanContext(trace_id, 7, False), resource=Resource.create({}),
                        attributes={"nested": nested}, start_time=1, end_time=2)  # type: ignore[dict-item]


def test_a_span_that_cannot_be_encoded_costs_only_itself(tmp_path: Path, sender: type[FakeSender],
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    delivery = Delivery(settings(tmp_path))
    delivery.start()
    submit_together(delivery, [*trace(1, 2), unencodable(2), *trace(2, 1), *trace(3, 2)])
    assert delivery.flush(5)
    delivery.submit(unencodable(4))  # a batch of it alone: nothing to post, nothing to keep
    assert delivery.flush(5)
    delivery.close()
    assert len(sender.posts) == 1
    assert Spool.of(settings(tmp_path)).survey(ENDPOINT).spans == 0
    sent = [(span.trace_id[-1], span.name) for payload in sender.posts
            for resource in ExportTraceServiceRequest.FromString(payload).resource_spans
            for scope in resource.scope_spans for span in scope.spans]
    assert sorted(sent) == [(1, "step"), (1, "step"), (2, "step"), (3, "step"), (3, "step")]
    said = capfd.readouterr().err.splitlines()
    assert len(said) == 3, said
    for line, trace_id in zip(said[:2], (2, 4), strict=True):
        assert line.startswith(f"traced-run: dropped span 'bad step' of trace {trace_id:032x}: it could not "
                               "be encoded (RecursionError: maximum recursion depth exceeded"), said
    assert said[2] == "traced-run: 2 spans dropped (could not be encoded)", said


def test_a_kept_batch_counts_a_span_that_cannot_be_encoded_once(tmp_path: Path) -> None:
    keep, stats, _ = spool_writer(tmp_path, 1 << 20)
    bad = unencodable(9)
    keep.keep([*trace(1, 2), bad])
    keep.keep([bad])  # the exit path takes over a batch the delivery thread had encoded
    assert str(stats.exit_line(ENDPOINT)).endswith("; 1 span dropped (could not be encoded)")
