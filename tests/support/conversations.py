"""One pydantic-ai run per kind of message a conversation can hold, each by an
agent of its own name (the trace's name in MLflow), on FunctionModel stand-ins
that answer as a real model would: parallel tool calls, retries, structured
output, history, instructions, thinking, images, streamed and iterated runs.

The in-process snapshot tests (tests/unit/test_enrich.py) record these runs with an
in-memory exporter; the browser test (tests/test_browser.py) runs them as an
app under traced-run, whose source is this file."""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import Callable

from pydantic import BaseModel
from pydantic_ai import Agent, BinaryContent, ImageUrl, ModelRetry, RunContext
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel

PROMPT = "What do I owe, and where are my orders?"
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
"""A 1x1 PNG: a BinaryContent image well within max_binary_bytes."""
IMAGE_URL = "https://example.com/receipt.png"
RESULTS = {"balance": "owes 42.50 EUR", "orders": "has 2 orders in transit", "address": "lives at 1 Main St"}
"""What each tool of the support agent returns, after the customer."""


def _tool_results_came_back(messages: list[ModelMessage]) -> bool:
    last = messages[-1]
    return isinstance(last, ModelRequest) and any(isinstance(p, ToolReturnPart) for p in last.parts)


def _calls(count: int) -> Callable[[list[ModelMessage], AgentInfo], ModelResponse]:
    """A model that asks for ``count`` tools at once, then answers from their results."""
    tools = ("balance", "orders", "address")[:count]

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if _tool_results_came_back(messages):
            return ModelResponse(parts=[TextPart(f"Done: {count} lookups.")])
        return ModelResponse(parts=[ToolCallPart(tool, {"customer": "cust-Q7"}, tool_call_id=f"call_{tool}")
                                    for tool in tools])

    return model


def _support(name: str, model: FunctionModel) -> Agent[None, str]:
    agent = Agent(model, name=name, instructions="Be brief.")

    @agent.tool_plain
    def balance(customer: str) -> str:
        return f"{customer} {RESULTS['balance']}"

    @agent.tool_plain
    def orders(customer: str) -> str:
        return f"{customer} {RESULTS['orders']}"

    @agent.tool_plain
    def address(customer: str) -> str:
        return f"{customer} {RESULTS['address']}"

    return agent


def two_tools() -> None:
    _support("two-tools", FunctionModel(_calls(2))).run_sync(PROMPT)


def three_tools() -> None:
    _support("three-tools", FunctionModel(_calls(3))).run_sync(PROMPT)


def retries() -> None:
    """A call with invalid arguments (pydantic-ai's validation retry), then a
    tool that raises ModelRetry, then the answer."""

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        answered = sum(isinstance(m, ModelResponse) for m in messages)
        if answered == 0:
            return ModelResponse(parts=[ToolCallPart("refund", {"amount": "lots"}, tool_call_id="call_bad")])
        if answered == 1:
            return ModelResponse(parts=[ToolCallPart("refund", {"order": "o-1", "amount": 5},
                                                     tool_call_id="call_retry")])
        return ModelResponse(parts=[TextPart("Refund not possible for o-1.")])

    agent = Agent(FunctionModel(model), name="retries")

    @agent.tool_plain(retries=3)
    def refund(order: str, amount: int) -> str:
        raise ModelRetry(f"Order {order} was never paid: ask the customer for another order.")

    agent.run_sync("Refund my order.")


class Refund(BaseModel):
    order: str
    amount: float


def structured() -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        (tool,) = info.output_tools
        return ModelResponse(parts=[ToolCallPart(tool.name, {"order": "o-1", "amount": 12.5},
                                                 tool_call_id="call_out")])

    Agent(FunctionModel(model), name="structured", output_type=Refund).run_sync("Refund o-1 by 12.50.")


def multi_turn() -> None:
    """A plain-text run, then a second run that carries the first as history."""

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        turns = sum(isinstance(m, ModelResponse) for m in messages)
        answers = ("Hello! How can I help?", "Your order ships Friday.")
        return ModelResponse(parts=[TextPart(answers[turns % 2])])

    agent = Agent(FunctionModel(model), name="multi-turn")
    first = agent.run_sync("Hi there.")
    agent.run_sync("When does my order ship?", message_history=first.all_messages())


def prompts() -> None:
    """A system prompt, static instructions and dynamic instructions."""

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("Ok.")])

    agent = Agent(FunctionModel(model), name="prompts", system_prompt="You are the support desk of ACME.",
                  instructions="Answer in one sentence.")

    @agent.instructions
    def tier(ctx: RunContext[None]) -> str:
        return "The customer is on the gold tier."

    agent.run_sync("Can I upgrade?")


def thinking() -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[ThinkingPart("The customer wants a date; orders ship on Fridays."),
                                    TextPart("Friday.")])

    Agent(FunctionModel(model), name="thinking").run_sync("When will it ship?")


def images() -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("Two receipts.")])

    Agent(FunctionModel(model), name="images").run_sync(
        ["What are these?", ImageUrl(url=IMAGE_URL), BinaryContent(data=PIXEL, media_type="image/png")])


def streamed() -> None:
    """The same agent run with run_sync, run_stream, run_stream_events and iter,
    on TestModel, whose streamed first response reports no output tokens."""
    agent = _support("run-sync", TestModel())
    agent.run_sync(PROMPT)

    async def run() -> None:
        agent.name = "run-stream"
        async with agent.run_stream(PROMPT) as result:
            await result.get_output()
        agent.name = "run-stream-events"
        async with agent.run_stream_events(PROMPT) as events:
            async for _ in events:
                pass
        agent.name = "iter"
        async with agent.iter(PROMPT) as run:
            async for _ in run:
                pass

    asyncio.run(run())


KINDS: dict[str, Callable[[], None]] = {
    "two-tools": two_tools, "three-tools": three_tools, "retries": retries, "structured": structured,
    "multi-turn": multi_turn, "prompts": prompts, "thinking": thinking, "images": images,
    "streamed": streamed,
}
"""Each kind, by its agent's name (streamed names its runs run-sync, run-stream, run-stream-events, iter)."""


TRACES = {kind: 1 for kind in KINDS} | {"multi-turn": 2, "streamed": 4}
"""How many traces (agent runs) each kind makes."""


if __name__ == "__main__":
    for kind in sys.argv[1:] or list(KINDS):
        KINDS[kind]()
