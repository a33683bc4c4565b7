"""MLflow stores a request all or nothing: a batch MLflow rejects is posted
again trace by trace, once, so only the traces it rejects go aside."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from support.fakes import NOT_FOUND, FakeSender, settings, span, submit_together, trace

from traced_run.delivery import Delivery
from traced_run.delivery.export import DELIVERED, Outcome, by_trace, encode, target_of
from traced_run.delivery.spool import Spool

ENDPOINT = "http://127.0.0.1:9/v1/traces"
BAD = b"poison"


def judge(payload: bytes) -> Outcome:
    return NOT_FOUND if BAD in payload else DELIVERED


def spans_of_three_traces() -> list[ReadableSpan]:
    return [*trace(1, 3), span(2, 0, name=BAD.decode()), span(2, 1), *trace(3, 2)]


def test_a_request_splits_into_one_per_trace(tmp_path: Path) -> None:
    parts = by_trace(encode(spans_of_three_traces(), settings(tmp_path)))
    assert [spans for _, spans in parts] == [3, 2, 2]
    assert [BAD in body for body, _ in parts] == [False, True, False]


def rejected_batches(spool: Spool) -> list[bytes]:
    return [p.read_bytes() for p in sorted(spool.rejected.glob("*.otlp"))]


def test_a_rejected_batch_loses_only_the_trace_mlflow_rejects(
        tmp_path: Path, sender: type[FakeSender], capfd: pytest.CaptureFixture[str]) -> None:
    sender.reset()
    sender.judge = judge
    delivery = Delivery(settings(tmp_path))
    submit_together(delivery, spans_of_three_traces())
    assert delivery.flush(5)
    delivery.close()
    assert len(sender.posts) == 4, "the whole batch, then each of its three traces once"
    spool = Spool.of(settings(tmp_path))
    (aside,) = rejected_batches(spool)
    assert BAD in aside and b'"spans": 2, "traces": 1' in aside
    said = capfd.readouterr().err
    assert said == f"traced-run: MLflow rejected a batch of 2 spans (HTTP 404: experiment not found); " \
                   f"set aside in {spool.rejected / aside_name(spool)}\n", said


def aside_name(spool: Spool) -> str:
    return sorted(spool.rejected.glob("*.otlp"))[0].name


def test_a_spooled_batch_mlflow_rejects_is_split_once_too(
        tmp_path: Path, sender: type[FakeSender]) -> None:
    sender.reset()
    sender.judge = judge
    config = settings(tmp_path)
    spool = Spool.of(config)
    spool.put(target_of(config), 7, 3, encode(spans_of_three_traces(), config))
    delivery = Delivery(config)
    delivery.start()  # sends the spool left by an earlier process first
    assert delivery.flush(5)
    delivery.close()
    assert len(sender.posts) == 4
    (aside,) = rejected_batches(spool)
    assert BAD in aside
    assert spool.survey(ENDPOINT).batches == 0


def test_a_batch_of_one_trace_is_not_posted_again(tmp_path: Path, sender: type[FakeSender]) -> None:
    sender.reset(NOT_FOUND)
    delivery = Delivery(settings(tmp_path))
    submit_together(delivery, trace(1, 3))
    assert delivery.flush(5)
    delivery.close()
    assert len(sender.posts) == 1
