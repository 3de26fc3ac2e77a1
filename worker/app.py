"""Build the ARQ worker from a Settings object: its functions, options and resources."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Worker

from throttler.db import create_engine
from throttler.errors import REDIS_ERRORS
from throttler.logs import fields
from throttler.redis_conn import arq_redis_settings
from throttler.settings import Settings
from throttler.store import open_store
from worker.hop_limits import HopLimits
from worker.leases import LEASE_REFRESH_S, LEASE_S, LeasedWorker
from worker.netguard import AddressPolicy, guarded_client
from worker.taskkit import TaskBase, build_functions
from worker.taskkit.resources import JOB_SLOTS_KEY, RESOURCES_KEY, Resources
from worker.taskkit.status_writer import StatusWriter
from worker.tasks import DEFAULT_TASKS

log = logging.getLogger("worker")


def worker_id() -> str:
    """Name this worker process in events: ``hostname-pid``."""
    return f"{socket.gethostname()}-{os.getpid()}"


async def open_resources(
    settings: Settings, *, running_jobs: Callable[[], int] | None = None
) -> Resources:
    """Create what tasks share: database engine, status writer, HTTP client, thread pool,
    hop limits. ``running_jobs``: the worker's taken job slots (worker.leases)."""
    engine = create_engine(settings)
    identity = worker_id()
    status = StatusWriter(
        open_store(settings, engine).attempts, worker_id=identity, running_jobs=running_jobs
    )
    status.start_writing()
    return Resources(
        settings=settings,
        engine=engine,
        http=guarded_client(
            policy=AddressPolicy(allow_private=settings.download_allow_private),
            timeout_s=settings.download_timeout_s,
        ),
        # One thread per job slot: every running job may be a blocking one.
        executor=ThreadPoolExecutor(
            max_workers=settings.worker_concurrency, thread_name_prefix="task"
        ),
        worker_id=identity,
        status=status,
        hops=HopLimits.open(settings, engine),
    )


async def close_resources(resources: Resources) -> None:
    """Close what open_resources created."""
    # Do not wait for threads: one may still be inside a call whose task timed out. It
    # finishes that call and exits; nothing new is submitted after this.
    resources.executor.shutdown(wait=False, cancel_futures=True)
    try:
        # Jobs are finished or cancelled by now: this writes what they handed over.
        await resources.status.close()
    finally:
        try:
            await resources.http.aclose()
        finally:
            try:
                await resources.hops.close()
            finally:
                await resources.engine.dispose()


def worker_options(
    settings: Settings, *, tasks: Sequence[type[TaskBase[Any, Any]]] = DEFAULT_TASKS
) -> dict[str, Any]:
    """Return the keyword arguments of ``arq.worker.Worker`` (ARQ's WorkerSettings)."""

    async def on_startup(ctx: dict[Any, Any]) -> None:
        # ARQ runs on_startup each time its main loop starts, and the service restarts
        # that loop after a Redis outage: open the resources only once.
        if RESOURCES_KEY not in ctx:
            ctx[RESOURCES_KEY] = await open_resources(settings, running_jobs=ctx.get(JOB_SLOTS_KEY))

    async def on_shutdown(ctx: dict[Any, Any]) -> None:
        resources = ctx.pop(RESOURCES_KEY, None)
        if isinstance(resources, Resources):
            await close_resources(resources)

    return {
        "functions": build_functions(tasks, settings=settings),
        "redis_settings": arq_redis_settings(settings),
        "queue_name": settings.arq_queue_name,
        "max_jobs": settings.worker_concurrency,
        "poll_delay": settings.worker_poll_delay_s,
        "keep_result": settings.worker_keep_result_s,
        "on_startup": on_startup,
        "on_shutdown": on_shutdown,
        # A job whose start the database could not record (nothing ran) is retried by ARQ
        # (Retry, worker.taskkit.runner): the same dispatch, released once by the limits.
        # A cancelled job (SIGTERM) is re-queued too, but its attempt already put the
        # task back in the outbox, so the job starts nothing then; one whose start was
        # withdrawn (never ran) starts its dispatch.
        "retry_jobs": True,
        # A cancelled task's running job is interrupted through ARQ's abort protocol
        # (throttler.aborts; checked beside the poll loop, worker.leases).
        "allow_abort_jobs": True,
        # Results live in the database; ARQ's per-job lines would only repeat ours.
        "log_results": False,
    }


def build_worker(
    settings: Settings,
    *,
    tasks: Sequence[type[TaskBase[Any, Any]]] = DEFAULT_TASKS,
    burst: bool = False,
    handle_signals: bool = False,
    redis_pool: ArqRedis | None = None,
    lease_s: float = LEASE_S,
    lease_refresh_s: float = LEASE_REFRESH_S,
) -> LeasedWorker:
    """Create the ARQ worker (call inside the event loop that will run it).

    Signals are left to the caller (see worker.service) unless ``handle_signals``: ARQ's
    own handler cancels running jobs at once, with no grace period.
    """
    options = worker_options(settings, tasks=tasks)
    if redis_pool is not None:
        # ARQ then uses this pool instead of connecting itself (and closes it in close()).
        del options["redis_settings"]
    return LeasedWorker(
        **options,
        redis_pool=redis_pool,
        burst=burst,
        handle_signals=handle_signals,
        lease_s=lease_s,
        lease_refresh_s=lease_refresh_s,
    )


async def close_worker(worker: Worker) -> None:
    """Stop the worker: cancel running jobs (their tasks go back to the outbox, ARQ
    re-queues the jobs), run on_shutdown, close Redis.

    Works with Redis gone too: ARQ's close() then fails half-way, so what it would have
    closed is closed here.
    """
    for task in worker.tasks.values():
        task.cancel()
    if worker.main_task is not None:
        worker.main_task.cancel()
    # A cancelled job re-queues itself in Redis; when Redis is away that fails and the job
    # stays in the queue, its in-progress lease lapsing (see worker.leases).
    outcomes = await asyncio.gather(*worker.tasks.values(), return_exceptions=True)
    for job_id, outcome in zip(list(worker.tasks), outcomes, strict=True):
        if isinstance(outcome, Exception):
            log.warning(
                "worker.job_not_handed_back", extra=fields(task_id=job_id, error=repr(outcome))
            )
    worker.tasks.clear()
    with warnings.catch_warnings():
        # arq 0.28 closes its pool with redis-py 5's deprecated close(); nothing to act on.
        warnings.filterwarnings(
            "ignore", message=r"Call to deprecated close\.", category=DeprecationWarning
        )
        try:
            await worker.close()
        except REDIS_ERRORS as error:
            log.warning("worker.close_without_redis", extra=fields(error=repr(error)))
            if worker.on_shutdown is not None:
                await worker.on_shutdown(worker.ctx)
            pool = worker.pool
            if pool is not None:
                await pool.aclose(close_connection_pool=True)
