"""Workers killed mid-task, and Redis going away under a worker, with the real processes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select

from devtools.redis_server import free_port, start_redis_server
from tests.acceptance.processes import Cluster, Component, cluster
from tests.acceptance.side_effect_worker import SIDE_EFFECT_LOG_ENV
from tests.integration.worker_harness import (
    arq_pool,
    assert_refused_second_start,
    dispatch,
    wait_final,
    wait_status,
)
from tests.support import event_history, wait_for
from throttler.db import SessionFactory
from throttler.models import TaskEvent
from throttler.settings import Settings
from worker.leases import LEASE_S

SIDE_EFFECT_WORKER = "tests.acceptance.side_effect_worker"
# The lease lapses at most LEASE_S after the kill; the rest is polling and process noise.
RERUN_LIMIT_S = 8.0

pytestmark = pytest.mark.slow


def worker_env(settings: Settings) -> dict[str, str]:
    return {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "LOG_LEVEL": "INFO",
    }


async def wait_for_log(component: Component, text: str, *, count: int = 1) -> None:
    async def logged() -> bool:
        assert component.process.poll() is None, component.output()[-3000:]
        return component.output().count(text) >= count

    await wait_for(logged, timeout_s=30, message=f"{component.module} to log {text!r} x{count}")


async def start_ready(running: Cluster, module: str, **kwargs: dict[str, str]) -> Component:
    component = running.start(module, **kwargs)
    await wait_for_log(component, "worker.ready")
    return component


async def started_times(sessions: SessionFactory, task_id: str) -> list[float]:
    async with sessions() as session:
        rows = await session.scalars(
            select(TaskEvent.at)
            .where(TaskEvent.task_id == task_id, TaskEvent.event == "started")
            .order_by(TaskEvent.id)
        )
        return [at.timestamp() for at in rows]


async def test_killed_workers_retriable_job_runs_again_within_seconds(
    settings: Settings, sessions: SessionFactory, tmp_path: Path
) -> None:
    async with arq_pool(settings) as pool:
        with cluster(env=worker_env(settings), log_dir=tmp_path) as running:
            # The next attempt goes back through the outbox: a relay releases it.
            running.start("relay")
            first = await start_ready(running, "worker")
            task_id = await dispatch(
                sessions,
                pool,
                settings,
                name="non_blocking_long_running_task",
                # Long enough to outlast the second worker's start on a loaded machine.
                payload={"duration": 8},
            )
            await wait_status(sessions, task_id, "running")
            # Only now a second worker: the first one holds the job.
            second = await start_ready(running, "worker")
            first.kill()
            killed_at = time.time()
            task = await wait_final(sessions, task_id, timeout_s=30)
            assert task.status == "succeeded", second.output()

    started = await started_times(sessions, task_id)
    assert len(started) == 2
    rerun_s = started[1] - killed_at
    print(f"re-run {rerun_s:.2f}s after SIGKILL (lease {LEASE_S}s)")
    assert rerun_s < RERUN_LIMIT_S
    assert task.attempts == 2
    assert task.result == {"duration": 8}
    async with sessions() as session:
        history = await event_history(session, task_id)
    # The re-delivered job put the task back through the outbox; the relay released it.
    assert history == [
        "submitted",
        "queued",
        "started",
        "requeued",
        "queued",
        "started",
        "succeeded",
    ]


async def test_killed_workers_side_effecting_job_is_not_run_again(
    settings: Settings, sessions: SessionFactory, tmp_path: Path
) -> None:
    effects = tmp_path / "effects.log"
    env = {**worker_env(settings), SIDE_EFFECT_LOG_ENV: str(effects)}
    async with arq_pool(settings) as pool:
        with cluster(env=env, log_dir=tmp_path) as running:
            first = await start_ready(running, SIDE_EFFECT_WORKER)
            task_id = await dispatch(
                sessions,
                pool,
                settings,
                name="blocking_long_running_task",
                payload={"duration": 30},
            )

            async def effect_done() -> bool:
                return effects.exists() and effects.read_text().count("start") == 1

            await wait_for(effect_done, timeout_s=30, message="the side effect")
            second = await start_ready(running, SIDE_EFFECT_WORKER)
            first.kill()
            killed_at = time.time()
            task = await wait_final(sessions, task_id, timeout_s=30)
            assert task.status == "failed", second.output()

    assert task.finished_at is not None
    assert task.finished_at.timestamp() - killed_at < RERUN_LIMIT_S
    # The re-delivered job did not start it again: the effect happened exactly once.
    assert effects.read_text().splitlines() == [f"start {task_id} pid={first.process.pid}"]
    await assert_refused_second_start(sessions, task)


async def test_worker_waits_for_redis_and_rides_out_a_restart(
    settings: Settings, sessions: SessionFactory, tmp_path: Path
) -> None:
    port = free_port()
    settings = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    with cluster(env=worker_env(settings), log_dir=tmp_path) as running:
        # Redis is down at boot: the worker keeps trying.
        worker = running.start("worker")
        await wait_for_log(worker, "worker.redis_unavailable")
        redis = start_redis_server(port=port, workdir=tmp_path / "redis")
        try:
            await wait_for_log(worker, "worker.ready")
            async with arq_pool(settings) as pool:
                first_id = await dispatch(
                    sessions, pool, settings, name="greeting", payload={"name": "before"}
                )
                first = await wait_final(sessions, first_id)
            assert first.status == "succeeded", worker.output()

            # Redis goes away under the running worker, then comes back empty.
            redis.stop()
            await wait_for_log(worker, "worker.redis_unavailable", count=2)
            redis = start_redis_server(port=port, workdir=tmp_path / "redis")
            await wait_for_log(worker, "worker.redis_restored", count=2)
            async with arq_pool(settings) as pool:
                second_id = await dispatch(
                    sessions, pool, settings, name="greeting", payload={"name": "after"}
                )
                second = await wait_final(sessions, second_id)
            assert second.status == "succeeded", worker.output()
            assert worker.stop() == 0, worker.output()
        finally:
            redis.stop()

    log = worker.output()
    # One line per change of state, however long each outage lasted.
    assert log.count("worker.redis_unavailable") == 2
    assert log.count("worker.redis_restored") == 2
    assert "Traceback" not in log
