"""A worker with a test-only side-effecting task and a configurable shutdown grace.

Test-only: ``python -m tests.acceptance.side_effect_worker`` with the worker's environment
plus ``SIDE_EFFECT_LOG`` (a file each start of the side-effecting task appends a line to).
The side-effecting task takes the catalog name
``blocking_long_running_task`` (and so its input, ``duration``) but sleeps on the event
loop; every other task is the production one.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from throttler.catalog import BLOCKING_LONG_RUNNING, DurationInput
from throttler.logs import configure_logging
from throttler.settings import load_settings
from worker.__main__ import run
from worker.taskkit import Resources, SideEffectingTask
from worker.tasks.download import Download
from worker.tasks.greeting import Greeting
from worker.tasks.long_running import DurationOutput, NonBlockingLongRunningTask

SIDE_EFFECT_LOG_ENV = "SIDE_EFFECT_LOG"


class LaunchMissile(SideEffectingTask[DurationInput, DurationOutput]):
    """Record the effect, then take ``duration`` seconds: killing the worker meanwhile
    leaves the outcome unknown."""

    name = BLOCKING_LONG_RUNNING.name
    output_model = DurationOutput

    async def run(self, resources: Resources, params: DurationInput) -> DurationOutput:
        with Path(os.environ[SIDE_EFFECT_LOG_ENV]).open("a") as log:
            log.write(f"start pid={os.getpid()}\n")
        await asyncio.sleep(params.duration)
        return DurationOutput(duration=params.duration)


def main() -> None:
    settings = load_settings()
    configure_logging(component="side-effect-worker", level=settings.log_level)
    run(
        settings,
        tasks=(Greeting, Download, NonBlockingLongRunningTask, LaunchMissile),
    )


if __name__ == "__main__":
    main()
