"""Spans, settings and senders for the fast in-process tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanContext

from traced_run.config.settings import Settings
from traced_run.delivery import Delivery
from traced_run.delivery.export import DELIVERED, Outcome, Sender
from traced_run.delivery.spool import Target

REFUSED = Outcome(False, False, "connection refused")
NOT_FOUND = Outcome(False, True, "HTTP 404: experiment not found", 404)


DEADLINE = 30.0
"""Longest a test waits for the delivery thread: only a hang takes that long, a loaded machine does not."""


class Clock:
    """A monotonic clock the test moves on, until it ``run``s."""

    def __init__(self) -> None:
        self.now = 100.0
        self._running_since: float | None = None

    def __call__(self) -> float:
        if self._running_since is None:
            return self.now
        return self.now + time.monotonic() - self._running_since

    def run(self) -> None:
        """Follow the real clock from now on. A delivery thread waits for what is left of
        its wait by this clock: while the test holds it still, that never runs out."""
        self._running_since = time.monotonic()


def span(trace: int, number: int, name: str = "step") -> ReadableSpan:
    return ReadableSpan(name, context=SpanContext(trace, trace * 1000 + number, False),
                        resource=Resource.create({}), attributes={"n": number}, start_time=1, end_time=2)


def run(number: int, children: int) -> list[ReadableSpan]:
    """An agent run's spans in the order they end: its children, then its root (span 0)."""
    root = SpanContext(number, number * 1000, False)
    return [ReadableSpan("step", context=SpanContext(number, number * 1000 + n, False), parent=root,
                         resource=Resource.create({}), start_time=1, end_time=2)
            for n in range(1, children + 1)] + [span(number, 0, "run")]


def trace(number: int, spans: int) -> list[ReadableSpan]:
    return [span(number, n) for n in range(spans)]


def settings(tmp_path: Path, **more: object) -> Settings:
    """No agent version: these tests run in traced-run's own checkout, whose version links
    would be posts of their own."""
    more = {"agent_version": "off", **more}
    return Settings(tracking_uri="http://127.0.0.1:9", spool_dir=str(tmp_path / "spool"), **more)  # type: ignore[arg-type]


class FakeSender(Sender):
    """Stands in for ``export.Sender`` (its ``post`` only): answers from ``judge``
    when set, else from ``answers`` (the last one for ever); when gated, only
    once the test releases each post."""

    judge: ClassVar[Callable[[bytes], Outcome] | None] = None
    answers: ClassVar[list[Outcome]] = [DELIVERED]
    gated = False
    posts: ClassVar[list[bytes]] = []
    posted = threading.Semaphore(0)
    release = threading.Semaphore(0)

    @classmethod
    def reset(cls, *answers: Outcome, gated: bool = False) -> None:
        cls.answers = list(answers) or [DELIVERED]
        cls.judge = None
        cls.gated = gated
        cls.posts = []
        cls.posted = threading.Semaphore(0)
        cls.release = threading.Semaphore(0)

    def post(self, payload: bytes, target: Target, timeout: float) -> Outcome:
        cls = type(self)
        if self.on_send is not None:
            self.on_send()
        cls.posts.append(payload)
        cls.posted.release()
        if cls.gated:
            cls.release.acquire(timeout=30)
        if cls.judge is not None:
            return cls.judge(payload)
        return cls.answers.pop(0) if len(cls.answers) > 1 else cls.answers[0]


def submit_together(delivery: Delivery, spans: list[ReadableSpan]) -> None:
    """Queue ``spans`` so that the delivery thread takes them as one batch (it takes
    under the queue's lock; a loaded machine may otherwise let it take the first alone)."""
    with delivery._queue.lock:
        for one in spans:
            delivery.submit(one)


def turn_ends_with(delivery: Delivery, done: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    """Wait until ``done`` holds at the end of one of the delivery thread's turns (each
    ends by waking the queue's waiters: no polling), or ``timeout`` is over."""
    with delivery._queue.lock:
        return delivery._queue.lock.wait_for(done, timeout)


def ended(delivery: Delivery, clock: Clock) -> None:
    """After ``close``: the test's clock runs, so the delivery thread's last wait ends and,
    its queue closed, the thread with it."""
    clock.run()
    if delivery._thread is not None:
        delivery._thread.join(DEADLINE)
        assert not delivery._thread.is_alive(), "the delivery thread did not end after close"


def delivery_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """The delivery and spill threads started since ``before`` was taken."""
    return [t for t in threading.enumerate()
            if t.name in ("traced-run-delivery", "traced-run-spill") and t not in before]
