"""The tasks this worker runs: one class per catalog entry, built from that entry."""

from __future__ import annotations

from typing import Any

from worker.taskkit import TaskBase
from worker.taskkit.definition import check_catalog_tasks
from worker.tasks.download import Download
from worker.tasks.greeting import Greeting
from worker.tasks.long_running import BlockingLongRunningTask, NonBlockingLongRunningTask

DEFAULT_TASKS: tuple[type[TaskBase[Any, Any]], ...] = (
    Greeting,
    Download,
    BlockingLongRunningTask,
    NonBlockingLongRunningTask,
)

# At import: the worker runs the catalog's own entries, so it cannot disagree with the API
# or the reconciler about a task's limits.
check_catalog_tasks(DEFAULT_TASKS)
