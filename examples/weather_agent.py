"""An ordinary pydantic-ai app: nothing in it knows about tracing.

TestModel stands in for an LLM, so the example needs no API key; with a real
model (``Agent("openai:gpt-4o", ...)``) nothing else changes.
"""

from pydantic_ai import Agent
from pydantic_ai.models.test import TestModel

agent = Agent(TestModel(), name="weather", instructions="Answer with the forecast.")


@agent.tool_plain
def forecast(city: str) -> str:
    """Tomorrow's forecast for a city."""
    return f"{city}: sunny, 21 C"


if __name__ == "__main__":
    print(agent.run_sync("What will the weather be in Paris tomorrow?").output)
