"""ARQ's abort protocol, as ``throttler.aborts`` and ``worker.leases`` use it, on a real Redis.

We rely on: the ``arq:abort`` sorted set (``arq.constants.abort_jobs_ss``); a running job's
task in ``Worker.job_tasks``; ``Worker.aborting_tasks``, a set that ``run_job`` reads to end
a cancelled job as aborted (its result a CancelledError, removed from the queue, never
re-queued even with ``retry_jobs``); ``Worker._cancel_aborted_jobs``, the poll loop's own
check, which ``LeasedWorker`` replaces. And on ARQ's pruning still being broken (an entry
older than a minute stays), which is why the API prunes. An ARQ upgrade that changes any
of this fails here (see the README, "Upgrading ARQ").
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss
from arq.jobs import Job
from arq.worker import Worker, func

from tests.contract.conftest import WorkerFactory, running
from tests.support import wait_for
from throttler.aborts import ABORT_KEY
from worker.leases import LeasedWorker

STARTED: set[str] = set()


async def sleeps(ctx: dict[str, Any]) -> None:
    STARTED.add(ctx["job_id"])
    await asyncio.sleep(60)


async def _running(worker: Worker, job_id: str) -> None:
    async def started() -> bool:
        return job_id in STARTED and job_id in worker.job_tasks

    await wait_for(started, message=f"job {job_id} to start")


async def _ended_aborted(arq_redis: ArqRedis, job_id: str) -> None:
    async def ended() -> bool:
        return await Job(job_id, arq_redis).result_info() is not None

    await wait_for(ended, message=f"job {job_id} to end")
    result = await Job(job_id, arq_redis).result_info()
    assert result is not None
    assert not result.success
    assert isinstance(result.result, asyncio.CancelledError)
    # Ended for good: not back in the queue for another run.
    assert await arq_redis.zscore(arq_redis.default_queue_name, job_id) is None


def test_our_key_is_arqs() -> None:
    assert ABORT_KEY == abort_jobs_ss == "arq:abort"


def test_the_poll_loop_check_we_replace_has_our_shape() -> None:
    check = Worker._cancel_aborted_jobs
    assert inspect.iscoroutinefunction(check)
    assert list(inspect.signature(check).parameters) == ["self"]
    assert "await self._cancel_aborted_jobs()" in inspect.getsource(Worker._poll_iteration)
    # Still broken: it removes entries newer than a minute from now, i.e. none.
    assert "min=timestamp_ms() + abort_job_max_age" in inspect.getsource(check)


async def test_a_job_marked_aborting_and_cancelled_ends_aborted_not_requeued(
    make_worker: WorkerFactory, arq_redis: ArqRedis
) -> None:
    # What LeasedWorker.check_aborts does to a plain ARQ worker's job.
    worker = make_worker(
        Worker, [func(sleeps, name="sleeps")], retry_jobs=True, allow_abort_jobs=True
    )
    assert isinstance(worker.aborting_tasks, set)
    assert isinstance(worker.job_tasks, dict)
    await arq_redis.enqueue_job("sleeps", _job_id="plain")
    async with running(worker):
        await _running(worker, "plain")
        worker.aborting_tasks.add("plain")
        worker.job_tasks["plain"].cancel()
        await _ended_aborted(arq_redis, "plain")
        assert "plain" not in worker.aborting_tasks


async def test_a_full_leased_worker_sees_an_abort_within_its_check_interval(
    make_worker: WorkerFactory, arq_redis: ArqRedis
) -> None:
    worker = make_worker(
        LeasedWorker,
        [func(sleeps, name="sleeps")],
        max_jobs=1,
        retry_jobs=True,
        allow_abort_jobs=True,
        abort_check_s=0.05,
    )
    await arq_redis.enqueue_job("sleeps", _job_id="first")
    await arq_redis.enqueue_job("sleeps", _job_id="second")
    async with running(worker):
        await _running(worker, "first")
        # Full: the poll loop waits in start_jobs for a slot, with "second" in hand.
        await arq_redis.zadd(abort_jobs_ss, {"first": int(time.time() * 1000)})
        await _ended_aborted(arq_redis, "first")
        await _running(worker, "second")
        assert await arq_redis.zscore(abort_jobs_ss, "first") is None
        worker.job_tasks["second"].cancel()


async def test_arq_leaves_an_old_abort_of_a_job_it_does_not_run(
    make_worker: WorkerFactory, arq_redis: ArqRedis
) -> None:
    worker = make_worker(Worker, [func(sleeps, name="sleeps")], allow_abort_jobs=True)
    old_ms = int((time.time() - 3600) * 1000)
    await arq_redis.zadd(abort_jobs_ss, {"long-gone": old_ms})

    async with running(worker):

        async def connected() -> bool:
            return worker.pool is not None

        await wait_for(connected, message="the worker's pool")
        await worker._cancel_aborted_jobs()

    assert await arq_redis.zscore(abort_jobs_ss, "long-gone") == old_ms
