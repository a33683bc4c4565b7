"""The global changes: each once, marked, wrapped, reversible; ``os._exit`` always exits."""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from traced_run import patches
from traced_run.pipeline import Router


@pytest.fixture(autouse=True)
def undone() -> Iterator[None]:
    yield
    patches.uninstall()


def greet(name: str) -> str:
    """Say hello."""
    return f"hello {name}"


def test_a_replacement_is_wrapped_marked_applied_once_and_undone() -> None:
    owner = types.SimpleNamespace(greet=greet)

    def loud(original: Any) -> Any:
        return lambda name: original(name).upper()

    assert patches.replace(owner, "greet", loud)
    assert not patches.replace(owner, "greet", loud), "a second install must change nothing"
    assert owner.greet("ann") == "HELLO ANN"
    wrapped = owner.greet
    assert (wrapped.__name__, wrapped.__doc__, wrapped.__wrapped__) == ("greet", "Say hello.", greet)
    assert getattr(owner.greet, patches.MARK)
    patches.uninstall()
    assert owner.greet is greet


def test_os_exit_exits_with_its_status_even_when_delivery_raises() -> None:
    def broken_delivery() -> None:
        raise RuntimeError("delivery broke")

    patches.exit_after(broken_delivery)
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(7)
        finally:  # reached only if os._exit returned or raised: the defect this test is for
            os.abort()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7


def test_the_routed_tracer_stands_for_the_tracer_in_everything() -> None:
    provider = TracerProvider(shutdown_on_exit=False)
    router = Router(SpanProcessor(), TracerProvider(shutdown_on_exit=False), ("pydantic-ai", "0"))
    tracer = provider.get_tracer("app")
    routed = router.tracer_for(provider, tracer)
    assert routed.resource is tracer.resource  # type: ignore[attr-defined]
    assert routed.instrumentation_info is tracer.instrumentation_info  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        routed.no_such_thing  # type: ignore[attr-defined]  # noqa: B018
