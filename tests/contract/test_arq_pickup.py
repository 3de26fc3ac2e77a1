"""Our pickup (worker.leases.LeasedWorker) runs ARQ's jobs as ARQ's own ``Worker`` does.

LeasedWorker replaces ``Worker.start_jobs`` (one Lua call takes a batch of jobs, with
short renewed in-progress leases) and keeps everything else of ARQ's: ``run_job``,
retries, aborts, results. Each test runs the same jobs through both worker classes, with
jobs put in the queue by both ``enqueue_job`` and our ``BatchEnqueuer``, and asserts the
same outcome, so an ARQ upgrade that changes the pickup contract fails here.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.constants import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from arq.jobs import Job, JobStatus
from arq.worker import JobExecutionFailed, Retry, Worker

from tests.contract.conftest import Enqueue, WorkerFactory, arq_enqueue, run_burst, running
from tests.support import wait_for
from worker.leases import LeasedWorker

JOB_ID = "contract-job"
RETRY_DEFER_S = 0.3
# The TTL ARQ's retry counter gets at each start (arq.worker.Worker.run_job).
RETRY_KEY_TTL_S = 88_400

# Start times of each job, by job id: how many times, and when, a job ran.
starts: defaultdict[str, list[float]] = defaultdict(list)


@pytest.fixture(autouse=True)
def _forget_starts() -> None:
    starts.clear()


async def answer(ctx: dict[str, Any]) -> dict[str, Any]:
    starts[ctx["job_id"]].append(time.monotonic())
    return {"answer": 42, "job_try": ctx["job_try"]}


async def retry_twice(ctx: dict[str, Any]) -> int:
    starts[ctx["job_id"]].append(time.monotonic())
    if ctx["job_try"] < 3:
        raise Retry(defer=RETRY_DEFER_S)
    return int(ctx["job_try"])


async def always_retry(ctx: dict[str, Any]) -> None:
    starts[ctx["job_id"]].append(time.monotonic())
    raise Retry(defer=0.01)


async def retry_much_later(ctx: dict[str, Any]) -> None:
    starts[ctx["job_id"]].append(time.monotonic())
    raise Retry(defer=60)


async def sleep_long(ctx: dict[str, Any]) -> None:
    starts[ctx["job_id"]].append(time.monotonic())
    await asyncio.sleep(60)


async def sleep_briefly(ctx: dict[str, Any]) -> int:
    starts[ctx["job_id"]].append(time.monotonic())
    await asyncio.sleep(1.5)
    return 1


FUNCTIONS = [answer, retry_twice, always_retry, retry_much_later, sleep_long, sleep_briefly]


async def _left_keys(redis: ArqRedis, worker: Worker) -> set[bytes]:
    """Keys in Redis, but the worker's health check."""
    keys = set(await redis.keys("*"))
    keys.discard(worker.health_check_key.encode())
    return keys


async def test_a_job_runs_and_reads_back_alike(
    arq_redis: ArqRedis,
    enqueue: Enqueue,
    worker_class: type[Worker],
    make_worker: WorkerFactory,
) -> None:
    assert await enqueue(arq_redis, job_id=JOB_ID, function="answer")
    worker = make_worker(worker_class, FUNCTIONS, burst=True)
    await run_burst(worker)

    job = Job(JOB_ID, arq_redis)
    assert await job.result(timeout=5) == {"answer": 42, "job_try": 1}
    assert await job.status() == JobStatus.complete
    info = await job.result_info()
    assert info is not None
    assert (info.function, info.args, info.kwargs, info.job_try, info.success) == (
        "answer",
        (),
        {},
        1,
        True,
    )
    assert info.queue_name == arq_redis.default_queue_name
    assert len(starts[JOB_ID]) == 1
    # ARQ's finish_job: only the result is left.
    assert await _left_keys(arq_redis, worker) == {(result_key_prefix + JOB_ID).encode()}
    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (1, 0, 0)


async def test_our_pickup_takes_the_job_with_a_renewed_lease(
    arq_redis: ArqRedis, enqueue: Enqueue, make_worker: WorkerFactory
) -> None:
    """LeasedWorker's own start_jobs ran (not ARQ's): a short lease, renewed past its TTL."""
    lease_ms = 500
    worker = make_worker(LeasedWorker, FUNCTIONS, lease_s=lease_ms / 1000, lease_refresh_s=0.1)
    assert isinstance(worker, LeasedWorker)
    assert await enqueue(arq_redis, job_id=JOB_ID, function="sleep_briefly")
    key = in_progress_key_prefix + JOB_ID
    async with running(worker):
        await wait_for(lambda: arq_redis.exists(key), message="the pickup")
        # ARQ's own pickup would set in_progress_timeout_s; ours set it too, so also check
        # that our script did the taking.
        assert worker._take_script is not None
        lease_seen_ms: list[int] = []
        while await arq_redis.exists(key):
            lease_seen_ms.append(int(await arq_redis.pttl(key)))
            await asyncio.sleep(0.05)
        job = Job(JOB_ID, arq_redis)
        assert await job.result(timeout=5) == 1

    # The job ran 1.5 s on 0.5 s leases: they were renewed, and never longer than a lease.
    assert len(lease_seen_ms) > 10
    # (-2: the key went between EXISTS and PTTL, as the job ended.)
    assert all(ttl == -2 or 0 < ttl <= lease_ms for ttl in lease_seen_ms), lease_seen_ms
    assert len(starts[JOB_ID]) == 1


async def test_retry_defers_and_reruns_alike(
    arq_redis: ArqRedis,
    enqueue: Enqueue,
    worker_class: type[Worker],
    make_worker: WorkerFactory,
) -> None:
    assert await enqueue(arq_redis, job_id=JOB_ID, function="retry_twice")
    worker = make_worker(worker_class, FUNCTIONS, burst=True)
    await run_burst(worker)

    job = Job(JOB_ID, arq_redis)
    assert await job.result(timeout=5) == 3
    info = await job.result_info()
    assert info is not None
    assert info.job_try == 3
    # Retry(defer=...) pushes the score back: the next start waits for it.
    first, second, third = starts[JOB_ID]
    assert second - first >= RETRY_DEFER_S - 0.01
    assert third - second >= RETRY_DEFER_S - 0.01
    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (1, 0, 2)
    # The retry counter goes with the finished job.
    assert await _left_keys(arq_redis, worker) == {(result_key_prefix + JOB_ID).encode()}


async def test_each_start_counts_a_try(
    arq_redis: ArqRedis, worker_class: type[Worker], make_worker: WorkerFactory
) -> None:
    assert await arq_enqueue(arq_redis, job_id=JOB_ID, function="retry_much_later")
    worker = make_worker(worker_class, FUNCTIONS)
    job = Job(JOB_ID, arq_redis)

    async def deferred() -> bool:
        return await job.status() == JobStatus.deferred

    async with running(worker):
        await wait_for(deferred, message="the retry to defer the job")
        assert await arq_redis.get(retry_key_prefix + JOB_ID) == b"1"
        ttl_s = await arq_redis.ttl(retry_key_prefix + JOB_ID)
        assert RETRY_KEY_TTL_S - 5 < ttl_s <= RETRY_KEY_TTL_S
        # Deferred, the job stays in the queue and its in-progress key is gone.
        assert not await arq_redis.exists(in_progress_key_prefix + JOB_ID)
        assert await arq_redis.exists(job_key_prefix + JOB_ID)
        assert worker.jobs_retried == 1
    assert len(starts[JOB_ID]) == 1


async def test_max_tries_fails_the_job_alike(
    arq_redis: ArqRedis,
    enqueue: Enqueue,
    worker_class: type[Worker],
    make_worker: WorkerFactory,
) -> None:
    assert await enqueue(arq_redis, job_id=JOB_ID, function="always_retry")
    worker = make_worker(worker_class, FUNCTIONS, burst=True, max_tries=2)
    await run_burst(worker)

    job = Job(JOB_ID, arq_redis)
    with pytest.raises(JobExecutionFailed, match="max 2 retries exceeded"):
        await job.result(timeout=5)
    info = await job.result_info()
    assert info is not None
    assert (info.success, info.job_try) == (False, 3)
    # Two starts ran the function; the third pickup counted a try and failed the job.
    assert len(starts[JOB_ID]) == 2
    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (0, 1, 2)
    assert await _left_keys(arq_redis, worker) == {(result_key_prefix + JOB_ID).encode()}


async def test_abort_cancels_a_running_job_alike(
    arq_redis: ArqRedis,
    enqueue: Enqueue,
    worker_class: type[Worker],
    make_worker: WorkerFactory,
) -> None:
    assert await enqueue(arq_redis, job_id=JOB_ID, function="sleep_long")
    worker = make_worker(worker_class, FUNCTIONS, allow_abort_jobs=True)
    job = Job(JOB_ID, arq_redis)

    async def in_progress() -> bool:
        return await job.status() == JobStatus.in_progress

    async with running(worker):
        await wait_for(in_progress, message="the job to start")
        assert await job.abort(timeout=10, poll_delay=0.05)

    info = await job.result_info()
    assert info is not None
    assert not info.success
    assert isinstance(info.result, asyncio.CancelledError)
    assert len(starts[JOB_ID]) == 1
    assert (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried) == (0, 1, 0)
    assert await _left_keys(arq_redis, worker) == {(result_key_prefix + JOB_ID).encode()}


async def test_abort_before_pickup_never_starts_the_job(
    arq_redis: ArqRedis,
    enqueue: Enqueue,
    worker_class: type[Worker],
    make_worker: WorkerFactory,
) -> None:
    assert await enqueue(arq_redis, job_id=JOB_ID, function="answer")
    job = Job(JOB_ID, arq_redis)
    aborting = asyncio.create_task(job.abort(timeout=10, poll_delay=0.05))

    async def abort_requested() -> bool:
        return await arq_redis.zscore(abort_jobs_ss, JOB_ID) is not None

    await wait_for(abort_requested, message="the abort request")
    worker = make_worker(worker_class, FUNCTIONS, burst=True, allow_abort_jobs=True)
    await run_burst(worker)

    assert await aborting
    assert starts[JOB_ID] == []
    info = await job.result_info()
    assert info is not None
    assert isinstance(info.result, asyncio.CancelledError)
    assert await _left_keys(arq_redis, worker) == {(result_key_prefix + JOB_ID).encode()}


async def test_a_job_held_elsewhere_or_not_due_is_left_alike(
    arq_redis: ArqRedis, worker_class: type[Worker], make_worker: WorkerFactory
) -> None:
    """ARQ's pickup conditions: nobody holds the in-progress key, and the job is due."""
    assert await arq_enqueue(arq_redis, job_id="a-held", function="answer")
    # Another worker's pickup of it.
    await arq_redis.psetex(in_progress_key_prefix + "a-held", 60_000, b"1")
    assert await arq_enqueue(arq_redis, job_id="b-free", function="answer")
    worker = make_worker(worker_class, FUNCTIONS)

    async with running(worker):
        assert await Job("b-free", arq_redis).result(timeout=5, poll_delay=0.05) == {
            "answer": 42,
            "job_try": 1,
        }
        # Queued after the held job (same score: ids in order), so looked at after it.
        assert starts["a-held"] == []
        assert await Job("a-held", arq_redis).status() == JobStatus.in_progress
        await arq_redis.delete(in_progress_key_prefix + "a-held")
        assert await Job("a-held", arq_redis).result(timeout=5, poll_delay=0.05) == {
            "answer": 42,
            "job_try": 1,
        }
