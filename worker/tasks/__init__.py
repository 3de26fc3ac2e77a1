"""The tasks this worker runs: one class per catalog entry."""

from __future__ import annotations

from typing import Any

from worker.taskkit import TaskBase
from worker.tasks.download import Download
from worker.tasks.greeting import Greeting
from worker.tasks.long_running import BlockingLongRunningTask, NonBlockingLongRunningTask

DEFAULT_TASKS: tuple[type[TaskBase[Any, Any]], ...] = (
    Greeting,
    Download,
    BlockingLongRunningTask,
    NonBlockingLongRunningTask,
)
