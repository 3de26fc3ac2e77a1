"""A task class checked against the catalog and resolved against the settings."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from throttler.catalog import CATALOG, TaskInput
from throttler.settings import Settings
from worker.taskkit.base import TaskBase


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskDefinition:
    """Everything the runner needs to run one kind of task."""

    task: TaskBase[Any, Any]
    name: str
    input_model: type[TaskInput]
    output_model: type[BaseModel]
    timeout_s: float
    max_tries: int
    # Never started twice and never retried: the class is side-effecting and did not opt in.
    at_most_once: bool


def define_task(task_class: type[TaskBase[Any, Any]], *, settings: Settings) -> TaskDefinition:
    """Check a task class and resolve its defaults; raise ValueError naming what is wrong."""
    label = task_class.__qualname__
    if inspect.isabstract(task_class):
        raise ValueError(f"{label} is abstract: implement run (or run_blocking)")
    name = getattr(task_class, "name", None)
    if not isinstance(name, str) or name not in CATALOG:
        raise ValueError(f"{label}.name {name!r} is not a task in throttler.catalog.CATALOG")
    output_model = getattr(task_class, "output_model", None)
    if not (isinstance(output_model, type) and issubclass(output_model, BaseModel)):
        raise TypeError(f"{label}.output_model must be a pydantic model class")
    timeout_s = settings.task_timeout_s if task_class.timeout_s is None else task_class.timeout_s
    if timeout_s <= 0:
        raise ValueError(f"{label}.timeout_s must be > 0, got {timeout_s}")
    max_tries = settings.worker_max_tries if task_class.max_tries is None else task_class.max_tries
    if max_tries < 1:
        raise ValueError(f"{label}.max_tries must be >= 1, got {max_tries}")
    return TaskDefinition(
        task=task_class(),
        name=name,
        input_model=CATALOG[name].input_model,
        output_model=output_model,
        timeout_s=float(timeout_s),
        max_tries=max_tries,
        at_most_once=task_class.side_effecting and not task_class.retry_side_effects,
    )
