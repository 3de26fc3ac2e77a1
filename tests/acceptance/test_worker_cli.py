"""``python -m worker`` as operators run it: settings errors, jobs, and a graceful SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.acceptance.processes import cluster
from tests.integration.worker_harness import (
    arq_pool,
    dispatch,
    load_task,
    wait_final,
    wait_status,
)
from tests.support import event_history
from throttler.db import SessionFactory
from throttler.settings import Settings

SIDE_EFFECT_WORKER = "tests.acceptance.side_effect_worker"


def test_invalid_setting_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env = {**os.environ, "WORKER_CONCURRENCY": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "worker"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "WORKER_CONCURRENCY" in done.stderr


def worker_env(settings: Settings) -> dict[str, str]:
    return {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "LOG_LEVEL": "INFO",
    }


@pytest.mark.slow
async def test_sigterm_lets_a_running_job_finish_within_the_grace(
    settings: Settings, sessions: SessionFactory, tmp_path: Path
) -> None:
    async with arq_pool(settings) as pool:
        with cluster(env=worker_env(settings), log_dir=tmp_path) as running:
            first = running.start("worker")
            greeting_id = await dispatch(
                sessions, pool, settings, name="greeting", payload={"name": "cli"}
            )
            greeting = await wait_final(sessions, greeting_id, timeout_s=30)
            assert greeting.status == "succeeded", first.output()

            sleeper_id = await dispatch(
                sessions,
                pool,
                settings,
                name="non_blocking_long_running_task",
                payload={"duration": 2},
            )
            await wait_status(sessions, sleeper_id, "running")
            assert first.stop() == 0, first.output()
            log = first.output()

    assert "worker.stopping" in log
    assert "worker.cancelling_jobs" not in log
    assert "worker.stopped" in log
    async with sessions() as session:
        sleeper = await load_task(sessions, sleeper_id)
        history = await event_history(session, sleeper_id)
    # Finished by the worker that was stopping, before it exited: no second attempt.
    assert sleeper.status == "succeeded"
    assert sleeper.attempts == 1
    assert sleeper.result == {"duration": 2}
    assert history[-2:] == ["started", "succeeded"]


@pytest.mark.slow
async def test_sigterm_requeues_a_job_longer_than_the_grace(
    settings: Settings, sessions: SessionFactory, tmp_path: Path
) -> None:
    async with arq_pool(settings) as pool:
        with cluster(env=worker_env(settings), log_dir=tmp_path) as running:
            first = running.start(SIDE_EFFECT_WORKER, extra_env={"WORKER_SHUTDOWN_GRACE_S": "0.5"})
            sleeper_id = await dispatch(
                sessions,
                pool,
                settings,
                name="non_blocking_long_running_task",
                payload={"duration": 4},
            )
            await wait_status(sessions, sleeper_id, "running")
            assert first.stop() == 0, first.output()
            log = first.output()
            assert "worker.cancelling_jobs" in log, log

            # Shutdown is not failure: the attempt is cut short and the task goes back
            # through the outbox, for a relay to release the next attempt.
            async with sessions() as session:
                history = await event_history(session, sleeper_id)
            assert history[-2:] == ["started", "requeued"]

            running.start("relay")
            second = running.start("worker")
            sleeper = await wait_final(sessions, sleeper_id, timeout_s=30)
            assert sleeper.status == "succeeded", second.output()

    assert sleeper.attempts == 2
    assert sleeper.result == {"duration": 4}
    async with sessions() as session:
        history = await event_history(session, sleeper_id)
    assert history[-5:] == ["started", "requeued", "queued", "started", "succeeded"]
