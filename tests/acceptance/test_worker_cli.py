"""``python -m worker`` as operators run it: settings errors, jobs, and a clean SIGTERM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.acceptance.processes import cluster
from tests.integration.worker_harness import arq_pool, dispatch, wait_final, wait_status
from tests.support import event_history
from throttler.db import SessionFactory
from throttler.settings import Settings


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


@pytest.mark.slow
async def test_sigterm_requeues_the_running_job_for_the_next_worker(
    settings: Settings, sessions: SessionFactory, tmp_path: Path
) -> None:
    env = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "LOG_LEVEL": "INFO",
    }
    async with arq_pool(settings) as pool:
        with cluster(env=env, log_dir=tmp_path) as running:
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
            assert "task.succeeded" in log
            assert "worker.stopped" in log

            # Shutdown is not failure: the attempt is cut short and the job handed back.
            async with sessions() as session:
                history = await event_history(session, sleeper_id)
            assert history[-1] == "started"

            second = running.start("worker")
            sleeper = await wait_final(sessions, sleeper_id, timeout_s=30)
            assert sleeper.status == "succeeded", second.output()

    assert sleeper.attempts == 2
    assert sleeper.result == {"duration": 2}
