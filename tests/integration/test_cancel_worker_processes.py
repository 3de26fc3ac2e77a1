"""Cancel against real worker processes (``python -m worker``), on SQLite and PostgreSQL.

A queued task whose ARQ job is already in Redis never starts once cancelled; a running
non-blocking task is interrupted within a second, also when every slot of its worker is
taken (the worker's poll loop then waits for a slot, and ARQ's own abort check with it).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from arq.connections import ArqRedis
from arq.jobs import Job, JobResult
from sqlalchemy import select

from tests.acceptance.processes import Cluster, Component, cluster
from tests.integration.worker_harness import arq_pool, dispatch, job_id_of, wait_status
from tests.support import event_history, wait_for
from throttler.db import SessionFactory
from throttler.models import Task
from throttler.settings import Settings

pytestmark = pytest.mark.slow

API = "/api/v1"
# SPEC: a non-blocking task is interrupted within 1 s of the cancel.
INTERRUPT_LIMIT_S = 1.0
LONG = {"duration": 120}


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "LOG_LEVEL": "INFO",
        # Stopping at the end of a test must not wait for a two-minute task.
        "WORKER_SHUTDOWN_GRACE_S": "1",
        **extra,
    }


async def _ready_worker(running: Cluster) -> Component:
    worker = running.start("worker")

    async def ready() -> bool:
        assert worker.process.poll() is None, worker.output()[-3000:]
        return "worker.ready" in worker.output()

    await wait_for(ready, timeout_s=30, message="the worker to be ready")
    return worker


async def _result(pool: ArqRedis, settings: Settings, job_id: str) -> JobResult | None:
    job = Job(job_id, pool, _queue_name=settings.arq_queue_name)
    return await job.result_info()


async def _interrupted_within_limit(
    pool: ArqRedis, settings: Settings, job_id: str, *, cancelled_at: float
) -> float:
    """Wait for the job's ARQ result; check it was aborted, and how soon after the cancel."""

    async def ended() -> JobResult | None:
        return await _result(pool, settings, job_id)

    result = await wait_for(ended, timeout_s=15, message=f"job {job_id} to end")
    assert result is not None
    # ARQ ended it as aborted: cancelled, not succeeded, not re-queued.
    assert not result.success
    assert type(result.result).__name__ == "CancelledError"
    assert await pool.zscore(settings.arq_queue_name, job_id) is None
    return result.finish_time.timestamp() - cancelled_at


async def _cancel(client: httpx.AsyncClient, task_id: str) -> float:
    response = await client.post(f"{API}/tasks/{task_id}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    return time.time()


async def _no_outcome_after_cancel(sessions: SessionFactory, task_id: str) -> None:
    async with sessions() as session:
        history = await event_history(session, task_id)
        task = (await session.scalars(select(Task).where(Task.id == task_id))).one()
    assert history == ["submitted", "queued", "started", "cancelled"]
    assert task.status == "cancelled"
    assert task.result is None


async def test_a_cancelled_task_never_starts_even_when_its_arq_job_was_queued(
    settings: Settings, sessions: SessionFactory, api_client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with arq_pool(settings) as pool:
        task_id = await dispatch(sessions, pool, settings, name="greeting", payload={"name": "x"})
        job_id = await job_id_of(sessions, task_id)
        assert await pool.zscore(settings.arq_queue_name, job_id) is not None
        await _cancel(api_client, task_id)
        with cluster(env=_env(settings), log_dir=tmp_path) as running:
            worker = await _ready_worker(running)

            async def job_taken() -> bool:
                return await pool.zscore(settings.arq_queue_name, job_id) is None

            # The worker picked the job up and ended it without starting the task.
            await wait_for(job_taken, timeout_s=15, message="the worker to take the job")
            skipped = [line for line in worker.output().splitlines() if "task.skipped" in line]
            assert any(task_id in line for line in skipped), worker.output()[-3000:]
    async with sessions() as session:
        assert await event_history(session, task_id) == ["submitted", "queued", "cancelled"]
    assert (await wait_status(sessions, task_id, "cancelled")).attempts == 0


async def test_a_running_task_is_interrupted_within_a_second(
    settings: Settings, sessions: SessionFactory, api_client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with arq_pool(settings) as pool:
        with cluster(env=_env(settings), log_dir=tmp_path) as running:
            worker = await _ready_worker(running)
            task_id = await dispatch(
                sessions, pool, settings, name="non_blocking_long_running_task", payload=LONG
            )
            job_id = await job_id_of(sessions, task_id)
            await wait_status(sessions, task_id, "running")

            cancelled_at = await _cancel(api_client, task_id)
            took_s = await _interrupted_within_limit(
                pool, settings, job_id, cancelled_at=cancelled_at
            )
            print(f"interrupted {took_s:.3f}s after the cancel answered")
            assert took_s <= INTERRUPT_LIMIT_S, worker.output()[-3000:]
            assert worker.process.poll() is None
            assert "task.interrupted" in worker.output()
    await _no_outcome_after_cancel(sessions, task_id)


async def test_a_running_task_is_interrupted_within_a_second_when_its_worker_is_full(
    settings: Settings, sessions: SessionFactory, api_client: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with arq_pool(settings) as pool:
        with cluster(env=_env(settings, WORKER_CONCURRENCY="2"), log_dir=tmp_path) as running:
            worker = await _ready_worker(running)
            first, second = [
                await dispatch(
                    sessions, pool, settings, name="non_blocking_long_running_task", payload=LONG
                )
                for _ in range(2)
            ]
            for task_id in (first, second):
                await wait_status(sessions, task_id, "running")
            # A third job waits in ARQ: the worker's poll loop waits for a free slot.
            waiting = await dispatch(
                sessions, pool, settings, name="non_blocking_long_running_task", payload=LONG
            )
            job_id = await job_id_of(sessions, first)

            cancelled_at = await _cancel(api_client, first)
            took_s = await _interrupted_within_limit(
                pool, settings, job_id, cancelled_at=cancelled_at
            )
            print(f"full worker: interrupted {took_s:.3f}s after the cancel answered")
            assert took_s <= INTERRUPT_LIMIT_S, worker.output()[-3000:]
            # Its slot is free again: the waiting job starts.
            await wait_status(sessions, waiting, "running")
            assert (await wait_status(sessions, second, "running")).attempts == 1
            # Leave nothing running behind.
            response = await api_client.post(f"{API}/tasks/cancel", json={})
            assert response.json()["count"] == 2
    await _no_outcome_after_cancel(sessions, first)
