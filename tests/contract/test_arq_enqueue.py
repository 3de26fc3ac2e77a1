"""Our batched enqueue (relay.enqueue) stores a job exactly as ``ArqRedis.enqueue_job`` does.

The relay hands jobs to ARQ with one Lua script per batch instead of ``enqueue_job``'s
WATCH / EXISTS / MULTI per job. ARQ's workers and ``arq.jobs.Job`` then read what the
script wrote, so it must be what ``enqueue_job`` would have written, byte for byte: if a
new ARQ stores jobs differently, these tests fail and the script must follow.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import arq.connections
import pytest
from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import Job, JobStatus
from arq.utils import timestamp_ms
from arq.worker import Worker

import relay.enqueue
from relay.enqueue import BatchEnqueuer, JobSpec
from tests.contract.conftest import (
    ENQUEUERS,
    Enqueue,
    WorkerFactory,
    arq_enqueue,
    batch_enqueue,
    run_burst,
)
from tests.support import wait_for

JOB_ID = "contract-job"
# Two Redis calls apart (PSETEX, then PTTL), the same expiry reads this close.
PTTL_SLACK_MS = 1_000


async def noop(ctx: dict[str, Any]) -> str:
    return "done"


async def _stored(redis: ArqRedis, job_id: str) -> dict[str, Any]:
    """Everything Redis holds after an enqueue, and what ARQ's Job reads of it."""
    job = Job(job_id, redis)
    return {
        "keys": sorted(await redis.keys("*")),
        "job": await redis.get(job_key_prefix + job_id),
        "score": await redis.zscore(redis.default_queue_name, job_id),
        "info": await job.info(),
        "status": await job.status(),
    }


@pytest.mark.parametrize(
    "defer_ms", [None, 30_000, -5_000], ids=["at-once", "deferred", "run-at-past"]
)
async def test_a_batched_job_is_stored_as_enqueue_job_stores_it(
    arq_redis: ArqRedis, monkeypatch: pytest.MonkeyPatch, defer_ms: int | None
) -> None:
    # The enqueue time is in the stored job: give both the same clock reading.
    now_ms = timestamp_ms()
    monkeypatch.setattr(arq.connections, "timestamp_ms", lambda: now_ms)
    monkeypatch.setattr(relay.enqueue, "timestamp_ms", lambda: now_ms)
    run_at = None if defer_ms is None else datetime.fromtimestamp((now_ms + defer_ms) / 1000, UTC)
    # ARQ's expiry rule: a day past the run time, counted from the enqueue.
    expected_pttl_ms = (0 if defer_ms is None else defer_ms) + arq_redis.expires_extra_ms

    assert await arq_enqueue(arq_redis, job_id=JOB_ID, function="noop", run_at=run_at)
    theirs = await _stored(arq_redis, JOB_ID)
    their_pttl_ms = await arq_redis.pttl(job_key_prefix + JOB_ID)
    await arq_redis.flushall()
    assert await batch_enqueue(arq_redis, job_id=JOB_ID, function="noop", run_at=run_at)
    ours = await _stored(arq_redis, JOB_ID)
    our_pttl_ms = await arq_redis.pttl(job_key_prefix + JOB_ID)

    assert ours == theirs
    assert theirs["score"] == now_ms + (defer_ms or 0)
    expected_status = JobStatus.deferred if defer_ms and defer_ms > 0 else JobStatus.queued
    assert theirs["status"] == expected_status
    for pttl_ms in (our_pttl_ms, their_pttl_ms):
        assert expected_pttl_ms - PTTL_SLACK_MS < pttl_ms <= expected_pttl_ms


async def test_one_batch_stores_each_job_as_enqueue_job_would(
    arq_redis: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs of several functions share payloads in the script's arguments, not in Redis."""
    now_ms = timestamp_ms()
    monkeypatch.setattr(arq.connections, "timestamp_ms", lambda: now_ms)
    monkeypatch.setattr(relay.enqueue, "timestamp_ms", lambda: now_ms)
    functions = ["noop", "other", "noop", "third", "other"]
    job_ids = [f"job-{index}" for index in range(len(functions))]

    for job_id, function in zip(job_ids, functions, strict=True):
        assert await arq_enqueue(arq_redis, job_id=job_id, function=function)
    theirs = [await _stored(arq_redis, job_id) for job_id in job_ids]
    await arq_redis.flushall()
    enqueuer = BatchEnqueuer(redis=arq_redis, queue_name=arq_redis.default_queue_name)
    specs = [
        JobSpec(job_id=job_id, function=function)
        for job_id, function in zip(job_ids, functions, strict=True)
    ]
    assert await enqueuer.enqueue(specs) == [True] * len(specs)
    ours = [await _stored(arq_redis, job_id) for job_id in job_ids]

    assert ours == theirs


@pytest.mark.parametrize("first", list(ENQUEUERS))
async def test_a_held_job_id_is_not_enqueued_again(
    arq_redis: ArqRedis, enqueue: Enqueue, first: str
) -> None:
    assert await ENQUEUERS[first](arq_redis, job_id=JOB_ID, function="noop")
    before = await _stored(arq_redis, JOB_ID)

    later = datetime.fromtimestamp(timestamp_ms() / 1000 + 60, UTC)
    assert not await enqueue(arq_redis, job_id=JOB_ID, function="other")
    assert not await enqueue(arq_redis, job_id=JOB_ID, function="noop", run_at=later)

    assert await _stored(arq_redis, JOB_ID) == before


async def test_a_finished_job_id_is_held_until_its_result_expires(
    arq_redis: ArqRedis, enqueue: Enqueue, make_worker: WorkerFactory
) -> None:
    assert await arq_enqueue(arq_redis, job_id=JOB_ID, function="noop")
    # keep_result: the result key, and so the id, is held one second after the job ends.
    await run_burst(make_worker(Worker, [noop], burst=True, keep_result=1))
    assert await arq_redis.exists(result_key_prefix + JOB_ID)
    assert not await arq_redis.exists(job_key_prefix + JOB_ID)

    assert not await enqueue(arq_redis, job_id=JOB_ID, function="noop")
    assert await Job(JOB_ID, arq_redis).status() == JobStatus.complete

    async def result_expired() -> bool:
        return not await arq_redis.exists(result_key_prefix + JOB_ID)

    await wait_for(result_expired, timeout_s=5, message="the result key to expire")
    assert await enqueue(arq_redis, job_id=JOB_ID, function="noop")
    assert await Job(JOB_ID, arq_redis).status() == JobStatus.queued
