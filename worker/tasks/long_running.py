"""The two long-running tasks: one blocks a thread, one sleeps on the event loop."""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel

from throttler.catalog import BLOCKING_LONG_RUNNING, NON_BLOCKING_LONG_RUNNING, DurationInput
from worker.taskkit import BlockingTask, Resources, RetriableTask


class DurationOutput(BaseModel):
    duration: int


class BlockingLongRunningTask(
    BlockingTask[DurationInput, DurationOutput], spec=BLOCKING_LONG_RUNNING
):
    """Block a worker thread for ``duration`` seconds."""

    output_model = DurationOutput

    def run_blocking(self, params: DurationInput) -> DurationOutput:
        time.sleep(params.duration)
        return DurationOutput(duration=params.duration)


class NonBlockingLongRunningTask(
    RetriableTask[DurationInput, DurationOutput], spec=NON_BLOCKING_LONG_RUNNING
):
    """Sleep on the event loop for ``duration`` seconds."""

    output_model = DurationOutput

    async def run(self, resources: Resources, params: DurationInput) -> DurationOutput:
        await asyncio.sleep(params.duration)
        return DurationOutput(duration=params.duration)
