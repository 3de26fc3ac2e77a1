"""The two long-running tasks: one blocks a thread, one sleeps on the event loop."""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel

from throttler.catalog import (
    BLOCKING_LONG_RUNNING,
    LONG_RUNNING_TIMEOUT_S,
    NON_BLOCKING_LONG_RUNNING,
    DurationInput,
)
from worker.taskkit import BlockingTask, Resources, RetriableTask


class DurationOutput(BaseModel):
    duration: int


class BlockingLongRunningTask(BlockingTask[DurationInput, DurationOutput]):
    """Block a worker thread for ``duration`` seconds."""

    name = BLOCKING_LONG_RUNNING.name
    output_model = DurationOutput
    timeout_s = LONG_RUNNING_TIMEOUT_S

    def run_blocking(self, params: DurationInput) -> DurationOutput:
        time.sleep(params.duration)
        return DurationOutput(duration=params.duration)


class NonBlockingLongRunningTask(RetriableTask[DurationInput, DurationOutput]):
    """Sleep on the event loop for ``duration`` seconds."""

    name = NON_BLOCKING_LONG_RUNNING.name
    output_model = DurationOutput
    timeout_s = LONG_RUNNING_TIMEOUT_S

    async def run(self, resources: Resources, params: DurationInput) -> DurationOutput:
        await asyncio.sleep(params.duration)
        return DurationOutput(duration=params.duration)
