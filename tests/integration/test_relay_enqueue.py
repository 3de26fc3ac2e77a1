"""The relay's batched enqueue against a real Redis and a real ARQ worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from arq import connections as arq_connections
from arq import func
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix
from arq.jobs import Job, JobStatus
from arq.utils import timestamp_ms
from arq.worker import Worker

import relay.enqueue
from relay.enqueue import BatchEnqueuer, JobSpec, Outcome
from throttler.models import utcnow

QUEUE = "arq:queue"


@pytest.fixture
async def arq(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    yield pool
    await pool.aclose()


async def _echo(ctx: dict[str, Any]) -> str:
    return f"ran {ctx['job_id']}"


async def _run_burst_worker(arq: ArqRedis) -> None:
    """Run an ARQ worker until the queue is empty, as ARQ's own ``burst`` mode does."""
    worker = Worker(
        functions=[func(_echo, name="greeting"), func(_echo, name="download")],
        redis_pool=arq,
        burst=True,
        poll_delay=0.01,
        handle_signals=False,
    )
    # Not worker.close(): it would close the fixture's pool (with a deprecated call).
    await worker.main()


async def test_a_real_worker_runs_batched_jobs(arq: ArqRedis) -> None:
    enqueuer = BatchEnqueuer(redis=arq, queue_name=QUEUE)
    jobs = [JobSpec(job_id=f"job-{i}", function=("greeting", "download")[i % 2]) for i in range(7)]
    assert await enqueuer.enqueue(jobs) == [True] * 7

    await _run_burst_worker(arq)
    for job in jobs:
        assert await Job(job.job_id, arq).result(timeout=5) == f"ran {job.job_id}"


async def test_a_batched_job_is_stored_as_enqueue_job_stores_it(arq: ArqRedis) -> None:
    run_at = utcnow() + timedelta(seconds=30)
    await arq.enqueue_job("greeting", _job_id="by-arq", _queue_name=QUEUE, _defer_until=run_at)
    enqueuer = BatchEnqueuer(redis=arq, queue_name=QUEUE)
    assert await enqueuer.enqueue([JobSpec(job_id="batched", function="greeting", run_at=run_at)])

    by_arq = await Job("by-arq", arq).info()
    batched = await Job("batched", arq).info()
    assert by_arq is not None
    assert batched is not None
    assert (batched.function, batched.args, batched.kwargs, batched.job_try, batched.score) == (
        by_arq.function,
        by_arq.args,
        by_arq.kwargs,
        by_arq.job_try,
        by_arq.score,
    )
    # Expiry: a day past the start time, as ARQ sets it (the two enqueues ms apart).
    ttl_by_arq = await arq.pttl(job_key_prefix + "by-arq")
    ttl_batched = await arq.pttl(job_key_prefix + "batched")
    assert abs(ttl_by_arq - ttl_batched) < 5_000
    assert await Job("batched", arq).status() == JobStatus.deferred


async def test_a_repeat_enqueue_is_a_no_op_while_arq_holds_the_id(arq: ArqRedis) -> None:
    enqueuer = BatchEnqueuer(redis=arq, queue_name=QUEUE)
    first = [JobSpec(job_id="a", function="greeting"), JobSpec(job_id="b", function="greeting")]
    assert await enqueuer.enqueue(first) == [True, True]
    stored = await Job("a", arq).info()

    # Queued: the job key exists. A new id in the same batch still goes in.
    again = [*first, JobSpec(job_id="c", function="greeting")]
    assert await enqueuer.enqueue(again) == [False, False, True]
    assert await Job("a", arq).info() == stored
    assert await arq.zcard(QUEUE) == 3

    # Finished: the result key exists, so the id is still refused, and nothing runs twice.
    await _run_burst_worker(arq)
    assert await enqueuer.enqueue(first) == [False, False]
    assert await arq.zcard(QUEUE) == 0
    # ARQ's own enqueue agrees.
    assert await arq.enqueue_job("greeting", _job_id="a", _queue_name=QUEUE) is None


async def test_an_on_time_job_whose_moment_is_past_is_not_added(arq: ArqRedis) -> None:
    enqueuer = BatchEnqueuer(redis=arq, queue_name=QUEUE)
    seconds, micros = await arq.time()
    now = datetime.fromtimestamp(seconds + micros / 1e6, UTC)
    jobs = [
        JobSpec(job_id="past", function="greeting", run_at=now - timedelta(milliseconds=5)),
        JobSpec(job_id="ahead", function="greeting", run_at=now + timedelta(seconds=30)),
        JobSpec(job_id="now", function="greeting"),
    ]
    await arq.enqueue_job("greeting", _job_id="held", _queue_name=QUEUE)
    held = JobSpec(job_id="held", function="greeting", run_at=now - timedelta(seconds=1))
    outcomes = await enqueuer.place([*jobs, held], on_time=True)
    # Late: taken back in the same atomic call, so ARQ never saw it. A job without a
    # run_at goes at once (nothing to be late for); one ARQ holds stays as it is.
    assert outcomes == [Outcome.LATE, Outcome.ADDED, Outcome.ADDED, Outcome.HELD]
    assert await arq.exists(job_key_prefix + "past") == 0
    assert await arq.zscore(QUEUE, "past") is None
    assert await arq.zscore(QUEUE, "held") is not None
    # Without on_time the past job goes in, as enqueue_job would put it (runnable at once).
    assert await enqueuer.place(jobs[:1]) == [Outcome.ADDED]


async def test_a_mixed_batch_is_stored_job_by_job_as_enqueue_job_stores_it(
    arq: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The batch goes to Redis as one line per job: deferred and immediate jobs of two
    # functions, a held id and a late one in the middle must each come out in place.
    # The enqueue time is in the stored job: give both enqueues the same clock reading.
    now_ms = timestamp_ms()
    monkeypatch.setattr(arq_connections, "timestamp_ms", lambda: now_ms)
    monkeypatch.setattr(relay.enqueue, "timestamp_ms", lambda: now_ms)
    seconds, micros = await arq.time()
    now = datetime.fromtimestamp(seconds + micros / 1e6, UTC)
    soon, later = now + timedelta(seconds=30), now + timedelta(minutes=5, milliseconds=7)
    await arq.enqueue_job("greeting", _job_id="held", _queue_name=QUEUE, _defer_until=later)
    held = await arq.get(job_key_prefix + "held")
    jobs = [
        JobSpec(job_id="deferred-greeting", function="greeting", run_at=soon),
        JobSpec(job_id="now-download", function="download"),
        JobSpec(job_id="held", function="download"),
        JobSpec(job_id="late", function="greeting", run_at=now - timedelta(seconds=1)),
        # Only a newline is refused: the id ends its line.
        JobSpec(job_id="an id with spaces 7 1", function="greeting"),
        JobSpec(job_id="deferred-download", function="download", run_at=later),
    ]
    outcomes = await BatchEnqueuer(redis=arq, queue_name=QUEUE).place(jobs, on_time=True)
    assert outcomes == [
        Outcome.ADDED,
        Outcome.ADDED,
        Outcome.HELD,
        Outcome.LATE,
        Outcome.ADDED,
        Outcome.ADDED,
    ]
    assert await arq.get(job_key_prefix + "held") == held
    assert await arq.exists(job_key_prefix + "late") == 0
    assert await arq.zscore(QUEUE, "late") is None

    for job in jobs:
        if job.job_id in ("held", "late"):
            continue
        reference = f"ref-{job.job_id}"
        assert await arq.enqueue_job(
            job.function, _job_id=reference, _queue_name=QUEUE, _defer_until=job.run_at
        )
        # Byte for byte the same job, the same score, the same expiry (calls ms apart).
        assert await arq.get(job_key_prefix + job.job_id) == await arq.get(
            job_key_prefix + reference
        )
        assert await arq.zscore(QUEUE, job.job_id) == await arq.zscore(QUEUE, reference)
        ttl = await arq.pttl(job_key_prefix + job.job_id)
        assert abs(ttl - await arq.pttl(job_key_prefix + reference)) < 1_000
    assert await arq.zcard(QUEUE) == 1 + 2 * 4


async def test_a_job_id_with_a_newline_is_refused_and_nothing_is_placed(arq: ArqRedis) -> None:
    jobs = [
        JobSpec(job_id="fine", function="greeting"),
        JobSpec(job_id="two\nlines", function="greeting"),
    ]
    with pytest.raises(ValueError, match="newline"):
        await BatchEnqueuer(redis=arq, queue_name=QUEUE).place(jobs)
    assert await arq.zcard(QUEUE) == 0
    assert await arq.exists(job_key_prefix + "fine") == 0
