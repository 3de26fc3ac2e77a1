"""ARQ's per-job transactions, batched per loop turn (worker.pipelines), end jobs as ARQ does.

LeasedWorker runs ARQ's own ``run_job`` and ``finish_job`` on a pool that sends the
transactions opened in one turn of the event loop as one MULTI/EXEC. Jobs of every kind
(a result, a retry, a failure, a re-run) started and ended together must leave Redis
exactly as ARQ's own worker leaves it, and the batching must really happen (else the
speed it buys is gone).
"""

from __future__ import annotations

import asyncio
from typing import Any

from arq.connections import ArqRedis
from arq.constants import retry_key_prefix
from arq.jobs import Job
from arq.worker import Retry, Worker
from redis.exceptions import ResponseError

from tests.contract.conftest import WorkerFactory, run_burst
from worker.leases import LeasedWorker
from worker.pipelines import BatchingPool

JOBS = 20
# Every job waits here until all have started, so that they all end in one turn.
gate: dict[str, Any] = {}


async def gated(ctx: dict[str, Any], kind: str) -> str:
    gate["started"] += 1
    if gate["started"] >= gate["expected"]:
        gate["open"].set()
    await gate["open"].wait()
    if kind == "retry" and ctx["job_try"] == 1:
        raise Retry(defer=0.01)
    if kind == "fail":
        raise ValueError("boom")
    return f"{kind} {ctx['job_try']}"


def _arm(expected: int) -> None:
    gate.update(started=0, expected=expected, open=asyncio.Event())


async def _exec_calls(redis: ArqRedis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_exec", {}).get("calls", 0))


async def _run(
    arq_redis: ArqRedis, make_worker: WorkerFactory, worker_class: type[Worker]
) -> tuple[dict[str, Any], set[bytes], tuple[int, int, int]]:
    await arq_redis.flushall()
    kinds = ["ok", "retry", "fail"]
    for index in range(JOBS):
        job = await arq_redis.enqueue_job("gated", kinds[index % 3], _job_id=f"job-{index}")
        assert job is not None
    # The retried jobs run twice; the second time they pass the gate as it is open.
    _arm(JOBS)
    worker = make_worker(worker_class, [gated], burst=True, max_jobs=JOBS)
    await run_burst(worker)
    results: dict[str, Any] = {}
    for index in range(JOBS):
        info = await Job(f"job-{index}", arq_redis).result_info()
        assert info is not None
        results[f"job-{index}"] = (
            info.success,
            info.job_try,
            repr(info.result) if isinstance(info.result, Exception) else info.result,
        )
    keys = {key for key in await arq_redis.keys("*") if not key.endswith(b"health-check")}
    return results, keys, (worker.jobs_complete, worker.jobs_failed, worker.jobs_retried)


async def test_jobs_ending_together_leave_redis_as_arq_does(
    arq_redis: ArqRedis, make_worker: WorkerFactory
) -> None:
    ours = await _run(arq_redis, make_worker, LeasedWorker)
    theirs = await _run(arq_redis, make_worker, Worker)

    assert ours == theirs
    results, keys, counters = ours
    assert results["job-0"] == (True, 1, "ok 1")
    assert results["job-1"] == (True, 2, "retry 2")
    assert results["job-2"][:2] == (False, 1)
    assert counters == (14, 6, 7)
    # No retry counters or job bodies left: only results.
    assert not any(key.startswith(retry_key_prefix.encode()) for key in keys)


async def test_jobs_of_one_turn_share_one_transaction(
    arq_redis: ArqRedis, make_worker: WorkerFactory
) -> None:
    counts: dict[str, int] = {}
    for worker_class in (Worker, LeasedWorker):
        await arq_redis.flushall()
        for index in range(JOBS):
            assert await arq_redis.enqueue_job("gated", "ok", _job_id=f"job-{index}")
        _arm(JOBS)
        before = await _exec_calls(arq_redis)
        worker = make_worker(worker_class, [gated], burst=True, max_jobs=JOBS)
        await run_burst(worker)
        counts[worker_class.__name__] = await _exec_calls(arq_redis) - before

    # ARQ: a transaction to take each job, one to start it, one to finish it.
    assert counts["Worker"] >= 3 * JOBS
    # Ours: the jobs are taken by one script call, started in one turn and ended in one
    # (give or take a turn: the gate opens inside the last job to start).
    assert counts["LeasedWorker"] <= 4, counts


async def test_a_failing_command_fails_only_its_own_job(arq_redis: ArqRedis) -> None:
    pool = BatchingPool(arq_redis)
    await arq_redis.set("text", "not a number")

    async def job(key: str) -> list[Any]:
        async with pool.pipeline(transaction=True) as pipe:
            pipe.set(f"{key}:seen", 1)
            pipe.incr(key)
            replies: list[Any] = await pipe.execute()
            return replies

    before = await _exec_calls(arq_redis)
    replies: list[Any] = await asyncio.gather(job("count"), job("text"), return_exceptions=True)
    counted, failed = replies

    assert await _exec_calls(arq_redis) - before == 1
    assert counted == [True, 1]
    assert isinstance(failed, ResponseError)
    # As in a transaction of its own: Redis ran the job's other commands.
    assert await arq_redis.get("text:seen") == b"1"
