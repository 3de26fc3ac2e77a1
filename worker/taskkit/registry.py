"""Turn task classes into ARQ functions, one per catalog name."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from typing import Any

from arq.worker import Function, func

from throttler.job_ids import Dispatch
from throttler.logs import fields
from throttler.settings import Settings
from worker.taskkit.base import TaskBase
from worker.taskkit.definition import TaskDefinition, define_task
from worker.taskkit.resources import resources_from
from worker.taskkit.runner import run_task

log = logging.getLogger(__name__)

# ARQ drops a job past its max_tries without running our code, so the task would never
# reach a terminal status. Our runner decides from the database attempt count; ARQ's
# limit only has to stay out of the way, including restarts after shutdowns, worker
# deaths and database outages at start (each counts as an ARQ try; see runner for the
# backoff between those, up to settings.worker_retry_backoff_max_s each).
ARQ_TRIES_HEADROOM = 10_000
# ARQ's timeout would end the job in ARQ (removed from the queue, our code cut short)
# while the task is still ``running`` in the database. Our runner enforces the task's own
# timeout, and the outcome write waits out database outages of any length (see persist),
# so ARQ's timeout is set out of reach.
ARQ_TIMEOUT_S = 365 * 24 * 3600.0
# Where the worker's ctx holds ARQ's ``aborting_tasks`` (worker.leases): the ids of jobs
# being cancelled by an abort, not by a stop.
ABORTING_KEY = "aborting_jobs"


def arq_function(definition: TaskDefinition) -> Function:
    """Wrap a task in an ARQ function named after it."""

    async def job(ctx: dict[Any, Any], *_args: Any, **_kwargs: Any) -> None:
        # The relay enqueues no arguments: the payload is read from the database, the one
        # source of truth. Stray arguments are ignored rather than failing the job in ARQ,
        # where the database would never hear of it. The job id names the task and its
        # dispatch (throttler.job_ids).
        dispatch = Dispatch.parse(str(ctx["job_id"]))
        if not dispatch.named:
            # Not from a relay (by hand, or a relay older than dispatch ids): it names no
            # attempt the limits released, so it starts none. A task it was meant for is
            # still queued under another job id, or recovered (throttler.reconcile).
            log.warning(
                "task.skipped",
                extra=fields(task_id=dispatch.task_id, reason="job id names no dispatch"),
            )
            return
        job_id = str(ctx["job_id"])
        aborting: Collection[str] = ctx.get(ABORTING_KEY, ())
        await run_task(
            definition,
            resources_from(ctx),
            task_id=dispatch.task_id,
            dispatch=dispatch,
            arq_try=int(ctx.get("job_try") or 1),
            # ARQ's own pool: announces the outcome to API long-polls (best effort).
            redis=ctx.get("redis"),
            aborted=lambda: job_id in aborting,
            # ARQ's score: when the job became due, in ms (a deferred job: its moment).
            due_at=float(ctx["score"]) / 1000 if ctx.get("score") else None,
        )

    job.__qualname__ = f"run_{definition.name}"
    return func(
        job,
        name=definition.name,
        max_tries=definition.max_tries + ARQ_TRIES_HEADROOM,
        timeout=ARQ_TIMEOUT_S,
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
        functions[definition.name] = arq_function(definition)
    return list(functions.values())
