"""ARQ as installed, next to our replacements of its enqueue and pickup, on a real Redis.

``enqueue`` is a way to put a job in ARQ's queue (``ArqRedis.enqueue_job``, or our
``relay.enqueue.BatchEnqueuer``); ``worker_class`` a way to run it (``arq.worker.Worker``
or our ``worker.leases.LeasedWorker``). Tests take either or both, so every pairing is
checked against ARQ's own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker

from relay.enqueue import BatchEnqueuer, JobSpec
from worker.app import close_worker
from worker.leases import LeasedWorker

# Put one argument-less job in the queue; True if it was added (False: its id is held).
Enqueue = Callable[..., Awaitable[bool]]
WorkerFactory = Callable[..., Worker]


@pytest.fixture
async def arq_redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    """An ARQ pool on the test's (emptied) Redis."""
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    yield pool
    await pool.aclose()


async def arq_enqueue(
    redis: ArqRedis, *, job_id: str, function: str, run_at: datetime | None = None
) -> bool:
    """ARQ's own enqueue."""
    job = await redis.enqueue_job(function, _job_id=job_id, _defer_until=run_at)
    return job is not None


async def batch_enqueue(
    redis: ArqRedis, *, job_id: str, function: str, run_at: datetime | None = None
) -> bool:
    """Ours: one job through the relay's batched script."""
    enqueuer = BatchEnqueuer(redis=redis, queue_name=redis.default_queue_name)
    [added] = await enqueuer.enqueue([JobSpec(job_id=job_id, function=function, run_at=run_at)])
    return added


ENQUEUERS = {"enqueue_job": arq_enqueue, "BatchEnqueuer": batch_enqueue}
# How long a background worker may take to leave its poll loop at the end of a test.
STOP_TIMEOUT_S = 2.0
WORKERS: dict[str, type[Worker]] = {"Worker": Worker, "LeasedWorker": LeasedWorker}


@pytest.fixture(params=list(ENQUEUERS))
def enqueue(request: pytest.FixtureRequest) -> Enqueue:
    return ENQUEUERS[request.param]


@pytest.fixture(params=list(WORKERS))
def worker_class(request: pytest.FixtureRequest) -> type[Worker]:
    return WORKERS[request.param]


@pytest.fixture
async def make_worker(redis_url: str) -> AsyncIterator[WorkerFactory]:
    """Build workers of either class, each on its own pool; close them after the test."""
    workers: list[Worker] = []

    def make(worker_class: type[Worker], functions: list[Any], **options: Any) -> Worker:
        worker = worker_class(
            functions=functions,
            redis_settings=RedisSettings.from_dsn(redis_url),
            handle_signals=False,
            poll_delay=0.01,
            **options,
        )
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        await close_worker(worker)


async def run_burst(worker: Worker) -> None:
    """Run ``worker`` until the queue is empty and its jobs are done (ARQ's burst mode)."""
    assert worker.burst, "build the worker with burst=True"
    await asyncio.wait_for(worker.main(), timeout=30)


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    """Run ``worker``'s poll loop in the background for the block (closed by make_worker)."""
    worker.main_task = main = asyncio.create_task(worker.main())
    try:
        yield worker
    finally:
        # Leave between polls where possible, as a burst worker does on an empty queue:
        # cancelling mid-poll can strand one of ARQ's pipelines.
        worker.burst = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(main), timeout=STOP_TIMEOUT_S)
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main
