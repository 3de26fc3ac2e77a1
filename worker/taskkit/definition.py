"""A task class checked against the catalog and resolved against the settings."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from throttler.catalog import CATALOG, TaskInput, TaskSpec
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
    # Never started twice and never retried: the spec is side-effecting and did not opt in.
    at_most_once: bool


def define_task(task_class: type[TaskBase[Any, Any]], *, settings: Settings) -> TaskDefinition:
    """Check a task class and resolve its spec's defaults; raise ValueError naming what is wrong.

    The class's spec may be a variant of its catalog entry (a test's), but its name must be
    one the API accepts and its input model the one the API validates with: anything else
    could be submitted and never run, or run on input nobody checked.
    """
    label = task_class.__qualname__
    if inspect.isabstract(task_class):
        raise ValueError(f"{label} is abstract: implement run (or run_blocking)")
    spec: TaskSpec | None = getattr(task_class, "spec", None)
    if spec is None:
        raise ValueError(f"{label} has no spec: define it with spec=<a throttler.catalog entry>")
    accepted = CATALOG.get(spec.name)
    if accepted is None:
        raise ValueError(f"{label}.name {spec.name!r} is not a task in throttler.catalog.CATALOG")
    if spec.input_model is not accepted.input_model:
        raise ValueError(
            f"{label}: input model {spec.input_model.__name__} is not the catalog's "
            f"{accepted.input_model.__name__}, which the API validates {spec.name!r} with"
        )
    output_model = getattr(task_class, "output_model", None)
    if not (isinstance(output_model, type) and issubclass(output_model, BaseModel)):
        raise TypeError(f"{label}.output_model must be a pydantic model class")
    return TaskDefinition(
        task=task_class(),
        name=spec.name,
        input_model=spec.input_model,
        output_model=output_model,
        timeout_s=float(settings.task_timeout_s if spec.timeout_s is None else spec.timeout_s),
        max_tries=settings.worker_max_tries if spec.max_tries is None else spec.max_tries,
        at_most_once=spec.at_most_once,
    )


def check_catalog_tasks(
    task_classes: Sequence[type[TaskBase[Any, Any]]],
    *,
    catalog: Mapping[str, TaskSpec] = CATALOG,
) -> None:
    """Raise ValueError unless the classes run exactly the catalog's entries, one each.

    For the production task list: there a spec must be the catalog's own entry, never a
    variant, so what the worker runs is what the API and the reconciler read.
    """
    specs = [getattr(task_class, "spec", None) for task_class in task_classes]
    variants = [
        task_class.__qualname__
        for task_class, spec in zip(task_classes, specs, strict=True)
        if spec is None or catalog.get(spec.name) is not spec
    ]
    if variants:
        raise ValueError(f"task classes not built from their catalog entry: {variants}")
    names = sorted(spec.name for spec in specs if spec is not None)
    if names != sorted(catalog):
        raise ValueError(f"task classes {names} do not match the catalog {sorted(catalog)}")
