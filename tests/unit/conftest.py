from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.fakes import Clock, FakeSender

from traced_run.delivery import export


@pytest.fixture
def sender(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeSender]]:
    """Every Delivery made in the test posts to a FakeSender (the delivery
    thread imports ``export.Sender`` when it starts)."""
    FakeSender.reset()
    monkeypatch.setattr(export, "Sender", FakeSender)
    yield FakeSender
    FakeSender.gated = False
    for _ in range(100):
        FakeSender.release.release()


@pytest.fixture
def clock() -> Iterator[Clock]:
    """The clock of a Delivery the test drives (``Delivery(..., clock=clock)``); it runs
    afterwards, so that a delivery thread the test leaves waiting on it ends."""
    held = Clock()
    yield held
    held.run()
