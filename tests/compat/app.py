"""An unchanged pydantic-ai app (not a line about tracing): one agent with a
tool and structured output, run once synchronously and once with asyncio.
It prints the two answers."""

import asyncio

from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.models.test import TestModel


class Forecast(BaseModel):
    city: str
    summary: str


agent = Agent(TestModel(), name="forecaster", output_type=Forecast, instructions="Be brief.")


@agent.tool_plain
def lookup(city: str) -> str:
    """Look a city up."""
    return f"{city}: sunny"


async def ask_async() -> Forecast:
    result = await agent.run("Weather in Paris?")
    return result.output


print(agent.run_sync("Weather in Rome?").output.model_dump_json())
print(asyncio.run(ask_async()).model_dump_json())
