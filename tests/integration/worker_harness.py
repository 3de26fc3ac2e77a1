"""Drive the worker in-process: queue tasks as the relay does, run a Worker, read outcomes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker
from sqlalchemy import delete

from relay.relay import Relay
from tests.support import event_history, get_task, submit_task, wait_for
from throttler.db import SessionFactory
from throttler.job_ids import Dispatch
from throttler.models import OutboxEntry, Task, utcnow
from throttler.settings import Settings
from throttler.statuses import TERMINAL_STATUSES
from throttler.store.outbox import CoreClaim, open_outbox
from throttler.throttle import Limiter, UnlimitedLimiter
from worker.app import build_worker, close_worker
from worker.taskkit import TaskBase
from worker.tasks import DEFAULT_TASKS

TEST_RELAY = "test-relay"
STOP_TIMEOUT_S = 5.0


def fast_retries(settings: Settings, **overrides: Any) -> Settings:
    """Return ``settings`` with millisecond retry backoff (plus any overrides)."""
    update: dict[str, Any] = {
        "worker_retry_backoff_s": 0.01,
        "worker_retry_backoff_max_s": 0.05,
        **overrides,
    }
    return settings.model_copy(update=update)


@contextlib.asynccontextmanager
async def arq_pool(settings: Settings) -> AsyncIterator[ArqRedis]:
    """Open the ARQ Redis pool a relay would use."""
    pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        yield pool
    finally:
        await pool.aclose()


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, *, tasks: Sequence[type[TaskBase[Any, Any]]] = DEFAULT_TASKS
) -> AsyncIterator[Worker]:
    """Run an ARQ worker in this event loop until the block exits, then close it."""
    worker = build_worker(settings, tasks=tasks, handle_signals=False)
    runner = asyncio.create_task(worker.async_run())
    try:
        yield worker
    finally:
        try:
            # Let the worker leave between polls, as a burst worker does once the queue is
            # empty: cancelling it mid-poll can strand a Redis pipeline (ARQ internals).
            worker.burst = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(runner), timeout=STOP_TIMEOUT_S)
        finally:
            await close_worker(worker)
            with contextlib.suppress(asyncio.CancelledError):
                await runner


@contextlib.asynccontextmanager
async def running_relay(
    settings: Settings, sessions: SessionFactory, pool: ArqRedis, *, limiter: Limiter | None = None
) -> AsyncIterator[Relay]:
    """Run a relay in this event loop until the block exits: it releases every attempt after
    the first (retries and requeues go back through the outbox)."""
    outbox = open_outbox(settings=settings, engine=sessions.kw["bind"])
    relay = Relay(settings=settings, outbox=outbox, arq=pool, limiter=limiter or UnlimitedLimiter())
    relaying = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        relay.stop()
        await asyncio.wait_for(relaying, timeout=STOP_TIMEOUT_S)


async def queue_task(sessions: SessionFactory, *, name: str, payload: Mapping[str, Any]) -> str:
    """Submit a task, mark it ``queued`` and drop its outbox row, as api and relay do;
    return its id."""
    async with sessions.begin() as session:
        task = await submit_task(
            session, name=name, account="default", payload=payload, now=utcnow()
        )
        await CoreClaim(session).mark_queued(task_ids=[task.id], relay_id=TEST_RELAY, now=utcnow())
        await session.execute(delete(OutboxEntry).where(OutboxEntry.task_id == task.id))
    return task.id


async def dispatch(
    sessions: SessionFactory,
    pool: ArqRedis,
    settings: Settings,
    *,
    name: str,
    payload: Mapping[str, Any],
) -> str:
    """Queue a task and enqueue its ARQ job exactly as the relay does: the dispatch's job
    id, no args."""
    task_id = await queue_task(sessions, name=name, payload=payload)
    await enqueue(pool, settings, name=name, job_id=await job_id_of(sessions, task_id))
    return task_id


async def job_id_of(sessions: SessionFactory, task_id: str) -> str:
    """The ARQ job id of the task's current dispatch (throttler.job_ids)."""
    task = await load_task(sessions, task_id)
    return Dispatch.of(task_id, queued_at=task.queued_at).job_id


async def enqueue(pool: ArqRedis, settings: Settings, *, name: str, job_id: str) -> None:
    """Enqueue a job, as the relay does: no arguments (see ``job_id_of`` for its id)."""
    job = await pool.enqueue_job(name, _job_id=job_id, _queue_name=settings.arq_queue_name)
    assert job is not None, f"ARQ refused job id {job_id}"


async def load_task(sessions: SessionFactory, task_id: str) -> Task:
    async with sessions() as session:
        task = await get_task(session, task_id=task_id)
    assert task is not None
    return task


async def wait_final(sessions: SessionFactory, task_id: str, *, timeout_s: float = 15.0) -> Task:
    """Wait until the task reaches a terminal status and return it."""

    async def probe() -> Task | None:
        task = await load_task(sessions, task_id)
        return task if task.status in TERMINAL_STATUSES else None

    task = await wait_for(probe, timeout_s=timeout_s, message=f"task {task_id} to finish")
    assert task is not None
    return task


async def wait_status(
    sessions: SessionFactory, task_id: str, status: str, *, timeout_s: float = 15.0
) -> Task:
    """Wait until the task has ``status`` and return it."""

    async def probe() -> Task | None:
        task = await load_task(sessions, task_id)
        return task if task.status == status else None

    task = await wait_for(probe, timeout_s=timeout_s, message=f"task {task_id} to be {status}")
    assert task is not None
    return task


async def assert_refused_second_start(sessions: SessionFactory, task: Task) -> None:
    """A side-effecting task whose worker died: the re-delivered job ended it, outcome
    unknown, without starting it again."""
    assert task.status == "failed"
    assert task.attempts == 1
    assert task.error is not None
    assert "its worker was lost during attempt 1" in task.error
    assert "outcome of the earlier attempt is unknown" in task.error
    async with sessions() as session:
        assert await event_history(session, task.id) == [
            "submitted",
            "queued",
            "started",
            "failed",
        ]
