from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.fakes import FakeSender

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
