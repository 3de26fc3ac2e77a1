"""Task base classes: what a task declares, and how its code is called.

A task class is given its catalog entry, ``class Greeting(RetriableTask[...], spec=GREETING)``:
name, input model and limits (timeout, tries, side effects) come from that ``TaskSpec``
and nowhere else. The class declares its output model and implements ``run``. Subclass:

- ``RetriableTask`` for idempotent work: any failure other than ``PermanentError`` or a
  timeout is retried with backoff up to the spec's ``max_tries``.
- ``SideEffectingTask`` for work that must run at most once: it is never retried and never
  started a second time, unless its spec sets ``retry_side_effects``.
- ``BlockingTask`` for synchronous code: implement ``run_blocking``; it runs on the worker's
  thread pool so the event loop keeps serving other jobs.

The base class and the spec must agree on side effects (a ``RetriableTask`` with a
side-effecting spec is a TypeError when the class is defined), and a class that still
sets a limit itself (``timeout_s = 5``) is refused, so the two cannot drift apart.
A test may give a class a variant of a catalog entry
(``spec=dataclasses.replace(GREETING, side_effecting=True)``); the worker still refuses
a name the API does not accept, or an input model other than the API's (see definition).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from throttler.catalog import TaskInput, TaskSpec
from worker.taskkit.resources import Resources

InputT = TypeVar("InputT", bound=TaskInput)
OutputT = TypeVar("OutputT", bound=BaseModel)

# What a TaskSpec holds: a class that sets one of these itself would have two sources.
_SPEC_ATTRIBUTES = frozenset(
    {"name", "input_model", "timeout_s", "max_tries", "side_effecting", "retry_side_effects"}
)


class TaskBase(ABC, Generic[InputT, OutputT]):
    """A kind of task the worker runs; one instance serves every job of that kind."""

    # The catalog entry this class runs, given as ``spec=`` in the class statement.
    spec: ClassVar[TaskSpec]
    # spec.name: a key of throttler.catalog.CATALOG, and the ARQ function name.
    name: ClassVar[str]
    output_model: ClassVar[type[BaseModel]]
    # What the base class promises about side effects (None: nothing); the spec must agree.
    _side_effecting: ClassVar[bool | None] = None

    def __init_subclass__(cls, *, spec: TaskSpec | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        label = cls.__qualname__
        own = sorted(_SPEC_ATTRIBUTES & vars(cls).keys())
        if own:
            raise TypeError(
                f"{label} sets {', '.join(own)} itself: that belongs in its TaskSpec "
                "(throttler.catalog), given as spec=..."
            )
        if spec is not None:
            if not isinstance(spec, TaskSpec):
                raise TypeError(f"{label}: spec must be a throttler.catalog.TaskSpec")
            cls.spec = spec
            cls.name = spec.name
        declared: TaskSpec | None = getattr(cls, "spec", None)
        promised = cls._side_effecting
        if declared is not None and promised not in (None, declared.side_effecting):
            base = "SideEffectingTask" if promised else "RetriableTask"
            raise TypeError(
                f"{label} is a {base} but its spec {declared.name!r} says "
                f"side_effecting={declared.side_effecting}"
            )

    @abstractmethod
    async def run(self, resources: Resources, params: InputT) -> OutputT:
        """Do the work for one attempt and return the result."""


class RetriableTask(TaskBase[InputT, OutputT]):
    """An idempotent task: safe to run again after a failure or a crash."""

    _side_effecting = False


class SideEffectingTask(TaskBase[InputT, OutputT]):
    """A task with effects outside the database: run at most once unless its spec opts in."""

    _side_effecting = True


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
