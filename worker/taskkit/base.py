"""Task base classes: what a task declares, and how its code is called.

A task class names a catalog entry (its input model comes from there), declares its output
model and limits, and implements ``run``. Subclass:

- ``RetriableTask`` for idempotent work: any failure other than ``PermanentError`` or a
  timeout is retried with backoff up to ``max_tries``.
- ``SideEffectingTask`` for work that must run at most once: it is never retried and never
  started a second time, unless the class sets ``retry_side_effects = True``.
- ``BlockingTask`` for synchronous code: implement ``run_blocking``; it runs on the worker's
  thread pool so the event loop keeps serving other jobs.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel

from throttler.catalog import TaskInput
from worker.taskkit.resources import Resources

InputT = TypeVar("InputT", bound=TaskInput)
OutputT = TypeVar("OutputT", bound=BaseModel)


class TaskBase(ABC, Generic[InputT, OutputT]):
    """A kind of task the worker runs; one instance serves every job of that kind."""

    # A key of throttler.catalog.CATALOG; also the ARQ function name.
    name: ClassVar[str]
    output_model: ClassVar[type[BaseModel]]
    # None means the worker default: settings.task_timeout_s / settings.worker_max_tries.
    timeout_s: ClassVar[float | None] = None
    max_tries: ClassVar[int | None] = None
    # At-most-once: a second start is refused because the first one's outcome is unknown.
    side_effecting: ClassVar[bool] = False
    # Lets a side-effecting task be retried and restarted anyway (it knows how to dedupe).
    retry_side_effects: ClassVar[bool] = False

    @abstractmethod
    async def run(self, resources: Resources, params: InputT) -> OutputT:
        """Do the work for one attempt and return the result."""


class RetriableTask(TaskBase[InputT, OutputT]):
    """An idempotent task: safe to run again after a failure or a crash."""


class SideEffectingTask(TaskBase[InputT, OutputT]):
    """A task with effects outside the database: run at most once unless it opts in."""

    side_effecting = True


class BlockingTask(TaskBase[InputT, OutputT]):
    """A task whose work is synchronous code, run on the worker's thread pool."""

    @abstractmethod
    def run_blocking(self, params: InputT) -> OutputT:
        """Do the work in a worker thread and return the result."""

    async def run(self, resources: Resources, params: InputT) -> OutputT:
        loop = asyncio.get_running_loop()
        # A timeout cancels this wait, not the thread: the thread finishes its call and
        # only then frees its slot in the pool.
        return await loop.run_in_executor(resources.executor, self.run_blocking, params)
