"""A worker with a test-only side-effecting task and a configurable shutdown grace.

Test-only: ``python -m tests.acceptance.side_effect_worker`` with the worker's environment
plus ``SIDE_EFFECT_LOG`` (a file each start of the side-effecting task appends a line to).
The side-effecting task takes the catalog name
``blocking_long_running_task`` (and so its input, ``duration``) but sleeps on the event
loop; every other task is the production one. Each line reads ``start <task id> pid=<pid>``:
the runner is wrapped to put the task id in a context variable, since a task is handed
only its resources and its input.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from throttler.catalog import BLOCKING_LONG_RUNNING, DurationInput
from throttler.logs import configure_logging
from throttler.settings import load_settings
from worker.__main__ import run
from worker.taskkit import Resources, SideEffectingTask, registry
from worker.taskkit.definition import TaskDefinition
from worker.taskkit.runner import run_task
from worker.tasks.download import Download
from worker.tasks.greeting import Greeting
from worker.tasks.long_running import DurationOutput, NonBlockingLongRunningTask

SIDE_EFFECT_LOG_ENV = "SIDE_EFFECT_LOG"

# The id of the task whose attempt is running in this asyncio task (each ARQ job has its own).
_current_task_id: ContextVar[str] = ContextVar("current_task_id", default="?")


async def _run_task_with_id(
    definition: TaskDefinition, resources: Resources, *, task_id: str, **options: Any
) -> None:
    token = _current_task_id.set(task_id)
    try:
        await run_task(definition, resources, task_id=task_id, **options)
    finally:
        _current_task_id.reset(token)


# The blocking task's catalog entry (name and input), made side-effecting, with the
# worker's default time limit.
LAUNCH_MISSILE = dataclasses.replace(BLOCKING_LONG_RUNNING, side_effecting=True, timeout_s=None)


class LaunchMissile(SideEffectingTask[DurationInput, DurationOutput], spec=LAUNCH_MISSILE):
    """Record the effect, then take ``duration`` seconds: killing the worker meanwhile
    leaves the outcome unknown."""

    output_model = DurationOutput

    async def run(self, resources: Resources, params: DurationInput) -> DurationOutput:
        with Path(os.environ[SIDE_EFFECT_LOG_ENV]).open("a") as log:
            log.write(f"start {_current_task_id.get()} pid={os.getpid()}\n")
        await asyncio.sleep(params.duration)
        return DurationOutput(duration=params.duration)


def main() -> None:
    settings = load_settings()
    configure_logging(component="side-effect-worker", level=settings.log_level)
    # ARQ functions look run_task up in the registry module when each job runs.
    assert vars(registry)["run_task"] is run_task, "worker.taskkit.registry changed"
    vars(registry)["run_task"] = _run_task_with_id
    run(
        settings,
        tasks=(Greeting, Download, NonBlockingLongRunningTask, LaunchMissile),
    )


if __name__ == "__main__":
    main()
