"""Turn task classes into ARQ functions, one per catalog name."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from arq.worker import Function, func

from throttler.settings import Settings
from worker.taskkit.base import TaskBase
from worker.taskkit.definition import TaskDefinition, define_task
from worker.taskkit.persist import WRITE_BACKOFF_S, WRITE_TRIES
from worker.taskkit.resources import resources_from
from worker.taskkit.runner import run_task

# ARQ drops a job past its max_tries without running our code, so the task would never
# reach a terminal status. Our runner decides from the database attempt count; ARQ's
# limit only has to stay out of the way, including restarts after shutdowns and
# database outages at start (each counts as an ARQ try).
ARQ_TRIES_HEADROOM = 100
# ARQ's timeout is a backstop for our own: it must also cover the start and final writes
# (each retried, see persist) so ARQ never cancels a task that is recording its outcome.
ARQ_TIMEOUT_MARGIN_S = 30.0


def arq_timeout_s(definition: TaskDefinition, settings: Settings) -> float:
    """Return ARQ's timeout for a task: ours plus the worst case of its database writes."""
    write_budget_s = (
        WRITE_TRIES * settings.database_timeout_s * 2 + WRITE_BACKOFF_S * 2.0**WRITE_TRIES
    )
    return definition.timeout_s + 2 * write_budget_s + ARQ_TIMEOUT_MARGIN_S


def arq_function(definition: TaskDefinition, settings: Settings) -> Function:
    """Wrap a task in an ARQ function named after it."""

    async def job(ctx: dict[Any, Any], *_args: Any, **_kwargs: Any) -> None:
        # The relay enqueues no arguments: the payload is read from the database, the one
        # source of truth. Stray arguments are ignored rather than failing the job in ARQ,
        # where the database would never hear of it.
        await run_task(
            definition,
            resources_from(ctx),
            task_id=str(ctx["job_id"]),
            arq_try=int(ctx.get("job_try") or 1),
        )

    job.__qualname__ = f"run_{definition.name}"
    return func(
        job,
        name=definition.name,
        max_tries=definition.max_tries + ARQ_TRIES_HEADROOM,
        timeout=arq_timeout_s(definition, settings),
    )


def build_functions(
    task_classes: Iterable[type[TaskBase[Any, Any]]], *, settings: Settings
) -> list[Function]:
    """Check each task class and return the ARQ functions; raise ValueError on a duplicate."""
    functions: dict[str, Function] = {}
    for task_class in task_classes:
        definition = define_task(task_class, settings=settings)
        if definition.name in functions:
            raise ValueError(f"two task classes are named {definition.name!r}")
        functions[definition.name] = arq_function(definition, settings)
    return list(functions.values())
