"""greeting: say hello."""

from __future__ import annotations

from pydantic import BaseModel

from throttler.catalog import GREETING, GreetingInput
from worker.taskkit import Resources, RetriableTask


class GreetingOutput(BaseModel):
    message: str


class Greeting(RetriableTask[GreetingInput, GreetingOutput], spec=GREETING):
    """Return ``Hello, <name>!``."""

    output_model = GreetingOutput

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        return GreetingOutput(message=f"Hello, {params.name}!")
