"""Recovery against a real Redis and a real database: lost jobs go back to the outbox."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from redis.asyncio import Redis
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.relay import Relay
from tests.integration.worker_harness import arq_pool, running_worker, wait_final
from tests.support import event_history, job_ids, submit_task, wait_for
from throttler.catalog import CATALOG, GREETING
from throttler.db import SessionFactory, create_engine
from throttler.models import OutboxEntry, Task, TaskEvent, utcnow
from throttler.reconcile import (
    UNKNOWN_OUTCOME_ERROR,
    Reconciler,
    ReconcileReport,
    reconcile_once,
    stuck_after_s,
)
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.outbox import open_outbox
from throttler.store.recovery import RecoveryStore, open_recovery
from throttler.throttle import UnlimitedLimiter

LONG_AGO = timedelta(minutes=5)
SIDE_EFFECTING_CATALOG = {**CATALOG, "greeting": dataclasses.replace(GREETING, side_effecting=True)}


async def _job_ids(sessions: SessionFactory, task_ids: list[str]) -> dict[str, str]:
    async with sessions() as session:
        return await job_ids(session, task_ids)


@pytest.fixture
async def arq(settings: Settings) -> AsyncIterator[ArqRedis]:
    async with arq_pool(settings) as pool:
        yield pool


@pytest.fixture
def recovery(settings: Settings, engine: AsyncEngine) -> RecoveryStore:
    return open_recovery(settings, engine)


def _unknown_outcome(*, status: str, attempts: int, why: str) -> str:
    return UNKNOWN_OUTCOME_ERROR.format(status=status, attempts=attempts, why=why)


JOB_GONE = "its ARQ job is gone"
PAST_LIMIT = "it is still running past its time limit"


async def _make_task(
    sessions: SessionFactory,
    *,
    status: TaskStatus,
    ago: timedelta = LONG_AGO,
    attempts: int = 0,
    tries_base: int = 0,
    name: str = "greeting",
    payload: dict[str, Any] | None = None,
) -> str:
    """A task as the relay (and a worker) left it: no outbox row, queued or started ``ago``."""
    at = utcnow() - ago
    async with sessions.begin() as session:
        task = await submit_task(
            session,
            name=name,
            account="default",
            payload=payload or {"name": "Ada"},
            now=at - timedelta(seconds=1),
        )
        await session.execute(delete(OutboxEntry).where(OutboxEntry.task_id == task.id))
        values: dict[str, Any] = {
            "status": status,
            "queued_at": at,
            "attempts": attempts,
            "tries_base": tries_base,
        }
        if status == TaskStatus.RUNNING:
            values["started_at"] = at
        await session.execute(update(Task).where(Task.id == task.id).values(values))
    return task.id


async def _task(sessions: SessionFactory, task_id: str) -> Task:
    async with sessions() as session:
        task = await session.get(Task, task_id)
    assert task is not None
    return task


async def _has_outbox_row(sessions: SessionFactory, task_id: str) -> bool:
    async with sessions() as session:
        count = await session.scalar(
            select(func.count()).select_from(OutboxEntry).where(OutboxEntry.task_id == task_id)
        )
    return bool(count)


async def _events(sessions: SessionFactory, task_id: str) -> list[TaskEvent]:
    async with sessions() as session:
        rows = await session.execute(
            select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.id)
        )
        return list(rows.scalars())


async def _history(sessions: SessionFactory, task_id: str) -> list[str]:
    async with sessions() as session:
        return await event_history(session, task_id)


async def _reconcile(
    settings: Settings, store: RecoveryStore, redis: Redis, **options: Any
) -> ReconcileReport:
    return await reconcile_once(
        store=store, redis=redis, settings=settings, now=utcnow(), **options
    )


async def _run_relay_and_worker(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis, task_ids: list[str]
) -> None:
    outbox = open_outbox(settings=settings, engine=sessions.kw["bind"])
    relay = Relay(settings=settings, outbox=outbox, arq=arq, limiter=UnlimitedLimiter())
    relaying = asyncio.create_task(relay.run())
    try:
        async with running_worker(settings):
            for task_id in task_ids:
                await wait_final(sessions, task_id)
    finally:
        relay.stop()
        await asyncio.wait_for(relaying, timeout=5)


async def test_tasks_lost_with_redis_are_requeued_and_run_exactly_once(
    settings: Settings,
    sessions: SessionFactory,
    recovery: RecoveryStore,
    redis: Redis,
    arq: ArqRedis,
) -> None:
    queued = [await _make_task(sessions, status=TaskStatus.QUEUED) for _ in range(3)]
    running = await _make_task(sessions, status=TaskStatus.RUNNING, attempts=1)
    retrying = await _make_task(sessions, status=TaskStatus.QUEUED, attempts=2)
    task_ids = [*queued, running, retrying]
    jobs = await _job_ids(sessions, task_ids)
    for task_id in task_ids:
        await arq.enqueue_job(
            "greeting", _job_id=jobs[task_id], _queue_name=settings.arq_queue_name
        )
    await redis.flushall()  # Redis restarted without persistence

    report = await _reconcile(settings, recovery, redis)

    assert sorted(report.requeued) == sorted(task_ids)
    assert report.failed == ()
    assert report.examined == len(task_ids)
    for task_id in task_ids:
        task = await _task(sessions, task_id)
        assert task.status == TaskStatus.PENDING
        assert task.queued_at is None
        assert await _has_outbox_row(sessions, task_id)
        last = (await _events(sessions, task_id))[-1]
        assert last.event == "requeued"
        previous = "running" if task_id == running else "queued"
        assert last.detail["reason"] == "job_missing"
        assert last.detail["previous_status"] == previous

    # A second pass finds nothing: the tasks are pending, in the outbox.
    assert (await _reconcile(settings, recovery, redis)).requeued == ()

    await _run_relay_and_worker(settings, sessions, arq, task_ids)
    for task_id in task_ids:
        task = await _task(sessions, task_id)
        assert task.status == TaskStatus.SUCCEEDED
        assert task.result == {"message": "Hello, Ada!"}
        async with sessions() as session:
            history = await event_history(session, task_id)
        assert history.count("succeeded") == 1
        assert history.count("requeued") == 1
        # Exactly one run after recovery.
        assert history[history.index("requeued") :].count("started") == 1


@pytest.mark.parametrize("prefix", [job_key_prefix, in_progress_key_prefix])
async def test_a_task_whose_job_lives_is_left_alone(
    settings: Settings, sessions: SessionFactory, recovery: RecoveryStore, redis: Redis, prefix: str
) -> None:
    queued = await _make_task(sessions, status=TaskStatus.QUEUED)
    running = await _make_task(sessions, status=TaskStatus.RUNNING, attempts=1)
    jobs = await _job_ids(sessions, [queued, running])
    for task_id in (queued, running):
        await redis.set(prefix + jobs[task_id], b"x")

    report = await _reconcile(settings, recovery, redis)

    assert report == ReconcileReport(examined=2)
    assert (await _task(sessions, queued)).status == TaskStatus.QUEUED
    assert (await _task(sessions, running)).status == TaskStatus.RUNNING
    for task_id in (queued, running):
        assert not await _has_outbox_row(sessions, task_id)
        assert await _history(sessions, task_id) == ["submitted"]


async def test_a_lone_arq_result_does_not_hide_a_lost_job(
    settings: Settings, sessions: SessionFactory, recovery: RecoveryStore, redis: Redis
) -> None:
    # ARQ ended the job without our runner (e.g. "job expired" after Redis lost its data):
    # only the result key is left, and it would turn the relay's enqueue into a no-op.
    task_id = await _make_task(sessions, status=TaskStatus.QUEUED)
    job = (await _job_ids(sessions, [task_id]))[task_id]
    await redis.set(result_key_prefix + job, b"x")

    report = await _reconcile(settings, recovery, redis)

    assert report == ReconcileReport(examined=1, requeued=(task_id,))
    assert (await _task(sessions, task_id)).status == TaskStatus.PENDING
    assert await _has_outbox_row(sessions, task_id)
    assert await _history(sessions, task_id) == ["submitted", "requeued"]
    assert not await redis.exists(result_key_prefix + job)


@pytest.mark.parametrize("ago", [timedelta(seconds=1), timedelta(seconds=-0.5)])
async def test_tasks_inside_the_grace_period_are_left_alone(
    settings: Settings,
    sessions: SessionFactory,
    recovery: RecoveryStore,
    redis: Redis,
    ago: timedelta,
) -> None:
    # Queued a second ago, or half a second ahead (a relay reserving tokens).
    queued = await _make_task(sessions, status=TaskStatus.QUEUED, ago=ago)
    running = await _make_task(sessions, status=TaskStatus.RUNNING, ago=ago, attempts=1)

    report = await _reconcile(settings, recovery, redis)

    assert report == ReconcileReport()
    assert (await _task(sessions, queued)).status == TaskStatus.QUEUED
    assert (await _task(sessions, running)).status == TaskStatus.RUNNING
    for task_id in (queued, running):
        assert await _history(sessions, task_id) == ["submitted"]


async def test_a_task_still_in_the_outbox_is_left_alone(
    settings: Settings, sessions: SessionFactory, recovery: RecoveryStore, redis: Redis
) -> None:
    # Leased by a relay that has not enqueued it yet: the lease, not recovery, covers it.
    task_id = await _make_task(sessions, status=TaskStatus.QUEUED)
    async with sessions.begin() as session:
        session.add(OutboxEntry(task_id=task_id, created_at=utcnow(), claimed_by="relay-1"))

    assert await _reconcile(settings, recovery, redis) == ReconcileReport()
    assert (await _task(sessions, task_id)).status == TaskStatus.QUEUED
    assert await _history(sessions, task_id) == ["submitted"]


async def test_side_effecting_task_that_may_have_started_fails_with_unknown_outcome(
    settings: Settings, sessions: SessionFactory, recovery: RecoveryStore, redis: Redis
) -> None:
    running = await _make_task(sessions, status=TaskStatus.RUNNING, attempts=1)
    retried = await _make_task(sessions, status=TaskStatus.QUEUED, attempts=1)
    never_started = await _make_task(sessions, status=TaskStatus.QUEUED, attempts=0)

    report = await _reconcile(settings, recovery, redis, catalog=SIDE_EFFECTING_CATALOG)

    assert report == ReconcileReport(
        examined=3, requeued=(never_started,), failed=tuple(sorted([running, retried]))
    )
    for task_id, status in ((running, "running"), (retried, "queued")):
        error = _unknown_outcome(status=status, attempts=1, why=JOB_GONE)
        task = await _task(sessions, task_id)
        assert (task.status, task.error) == (TaskStatus.FAILED, error)
        assert task.finished_at is not None
        assert not await _has_outbox_row(sessions, task_id)
        events = await _events(sessions, task_id)
        assert [event.event for event in events] == ["submitted", "failed"]
        assert events[-1].detail == {
            "reason": "job_missing",
            "previous_status": status,
            "attempt": 1,
            "error": error,
        }
    assert (await _task(sessions, never_started)).status == TaskStatus.PENDING
    assert await _has_outbox_row(sessions, never_started)
    assert await _history(sessions, never_started) == ["submitted", "requeued"]


async def test_side_effecting_task_lost_before_its_first_start_since_a_retry_is_requeued(
    settings: Settings, sessions: SessionFactory, recovery: RecoveryStore, redis: Redis
) -> None:
    # Failed after one attempt, explicitly retried, released, and its job lost with Redis:
    # nothing has started since the retry, so it goes back through the outbox.
    task_id = await _make_task(sessions, status=TaskStatus.QUEUED, attempts=1, tries_base=1)

    report = await _reconcile(settings, recovery, redis, catalog=SIDE_EFFECTING_CATALOG)

    assert report == ReconcileReport(examined=1, requeued=(task_id,), failed=())
    assert (await _task(sessions, task_id)).status == TaskStatus.PENDING
    assert await _has_outbox_row(sessions, task_id)


async def test_task_stuck_running_past_its_timeout_is_requeued_and_runs(
    settings: Settings,
    sessions: SessionFactory,
    recovery: RecoveryStore,
    redis: Redis,
    arq: ArqRedis,
) -> None:
    stuck_after = timedelta(seconds=stuck_after_s(GREETING, settings))
    stuck = await _make_task(
        sessions, status=TaskStatus.RUNNING, attempts=1, ago=stuck_after + timedelta(seconds=5)
    )
    # Not yet past its limit, though long past the grace period.
    slow = await _make_task(
        sessions, status=TaskStatus.RUNNING, attempts=1, ago=stuck_after - timedelta(seconds=30)
    )
    jobs = await _job_ids(sessions, [stuck, slow])
    for task_id in (stuck, slow):
        # A dead worker's leftovers: the job and its in-progress marker.
        await arq.enqueue_job(
            "greeting", _job_id=jobs[task_id], _queue_name=settings.arq_queue_name
        )
        await redis.set(in_progress_key_prefix + jobs[task_id], b"1")

    report = await _reconcile(settings, recovery, redis)

    assert report == ReconcileReport(examined=2, requeued=(stuck,))
    assert (await _events(sessions, stuck))[-1].detail == {
        "reason": "timed_out",
        "previous_status": "running",
        "attempt": 1,
    }
    assert (await _task(sessions, slow)).status == TaskStatus.RUNNING
    # The stale job is gone (it would start nothing, its dispatch is no longer the task's).
    stuck_job, slow_job = jobs[stuck], jobs[slow]
    assert not await redis.exists(job_key_prefix + stuck_job, in_progress_key_prefix + stuck_job)
    assert await redis.exists(job_key_prefix + slow_job)
    await redis.delete(job_key_prefix + slow_job, in_progress_key_prefix + slow_job)
    await redis.zrem(settings.arq_queue_name, slow_job)

    await _run_relay_and_worker(settings, sessions, arq, [stuck])
    task = await _task(sessions, stuck)
    assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 2)


async def test_side_effecting_task_stuck_running_fails(
    settings: Settings, sessions: SessionFactory, recovery: RecoveryStore, redis: Redis
) -> None:
    ago = timedelta(seconds=stuck_after_s(GREETING, settings) + 5)
    task_id = await _make_task(sessions, status=TaskStatus.RUNNING, attempts=1, ago=ago)
    await redis.set(job_key_prefix + (await _job_ids(sessions, [task_id]))[task_id], b"x")

    report = await _reconcile(settings, recovery, redis, catalog=SIDE_EFFECTING_CATALOG)

    assert report == ReconcileReport(examined=1, failed=(task_id,))
    error = _unknown_outcome(status="running", attempts=1, why=PAST_LIMIT)
    task = await _task(sessions, task_id)
    assert (task.status, task.error) == (TaskStatus.FAILED, error)
    assert not await _has_outbox_row(sessions, task_id)
    events = await _events(sessions, task_id)
    assert [event.event for event in events] == ["submitted", "failed"]
    assert events[-1].detail == {
        "reason": "timed_out",
        "previous_status": "running",
        "attempt": 1,
        "error": error,
    }


async def test_concurrent_reconcilers_requeue_each_task_once(
    settings: Settings, sessions: SessionFactory, recovery: RecoveryStore, redis: Redis
) -> None:
    task_ids = [await _make_task(sessions, status=TaskStatus.QUEUED) for _ in range(40)]
    engines = [create_engine(settings) for _ in range(3)]
    try:
        reports = await asyncio.gather(
            *(
                _reconcile(settings, open_recovery(settings, engine), redis, batch_size=7)
                for engine in engines
            )
        )
    finally:
        for engine in engines:
            await engine.dispose()

    requeued = [task_id for report in reports for task_id in report.requeued]
    assert sorted(requeued) == sorted(task_ids)
    async with sessions() as session:
        counts = dict(
            (
                await session.execute(
                    select(TaskEvent.task_id, func.count())
                    .where(TaskEvent.event == "requeued")
                    .group_by(TaskEvent.task_id)
                )
            ).all()
        )
        outbox = await session.scalar(select(func.count()).select_from(OutboxEntry))
    assert counts == dict.fromkeys(task_ids, 1)
    assert outbox == len(task_ids)


async def test_a_transition_during_the_pass_wins(
    settings: Settings, sessions: SessionFactory, recovery: RecoveryStore, redis: Redis
) -> None:
    task_id = await _make_task(sessions, status=TaskStatus.QUEUED)

    # A worker starts the task right after the reconciler's first Redis round trip.
    started = False

    async def start_task() -> None:
        nonlocal started
        if not started:
            started = True
            async with sessions.begin() as session:
                await session.execute(
                    update(Task)
                    .where(Task.id == task_id)
                    .values(status=TaskStatus.RUNNING, attempts=1, started_at=utcnow())
                )

    original = redis.pipeline

    def pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = original(*args, **kwargs)
        execute = pipe.execute

        async def execute_then_start(*a: Any, **k: Any) -> Any:
            result = await execute(*a, **k)
            await start_task()
            return result

        pipe.execute = execute_then_start  # type: ignore[method-assign]
        return pipe

    redis.pipeline = pipeline  # type: ignore[method-assign]
    report = await _reconcile(settings, recovery, redis)

    # Examined as queued and found without a job, but started before the write: left alone.
    assert report == ReconcileReport(examined=1)
    assert (await _task(sessions, task_id)).status == TaskStatus.RUNNING
    assert not await _has_outbox_row(sessions, task_id)
    assert await _history(sessions, task_id) == ["submitted"]


async def test_reconciler_loop_recovers_until_stopped(
    settings: Settings, sessions: SessionFactory, recovery: RecoveryStore, redis: Redis
) -> None:
    reconciler = Reconciler(
        settings=settings.model_copy(update={"reconcile_interval_s": 0.05}),
        store=recovery,
        redis=redis,
    )
    running = asyncio.create_task(reconciler.run())
    try:
        task_id = await _make_task(sessions, status=TaskStatus.QUEUED)

        async def requeued() -> bool:
            return (await _task(sessions, task_id)).status == TaskStatus.PENDING

        await wait_for(requeued, timeout_s=5, message="the reconciler to requeue the task")
        # Later passes find the task pending, in the outbox: requeued exactly once.
        passes = 3

        async def later_passes() -> bool:
            nonlocal passes
            passes -= 1
            return passes == 0

        await wait_for(later_passes, interval_s=0.05, message="three more intervals")
    finally:
        reconciler.stop()
        await asyncio.wait_for(running, timeout=5)
    assert await _history(sessions, task_id) == ["submitted", "requeued"]
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(OutboxEntry)) == 1


def test_timeouts_come_from_the_catalog(settings: Settings) -> None:
    long_task = CATALOG["blocking_long_running_task"]
    assert long_task.timeout_s is not None
    assert GREETING.timeout_s is None
    # The same margin past each task's own limit: the catalog's, else TASK_TIMEOUT_S.
    margin_s = stuck_after_s(GREETING, settings) - settings.task_timeout_s
    assert stuck_after_s(long_task, settings) == long_task.timeout_s + margin_s
    assert stuck_after_s(None, settings) == settings.task_timeout_s + margin_s
    # The margin covers the outcome write after the limit: longer with slower databases.
    slower = settings.model_copy(update={"database_timeout_s": settings.database_timeout_s * 2})
    assert stuck_after_s(GREETING, slower) > stuck_after_s(GREETING, settings)
