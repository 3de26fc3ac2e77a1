"""Redis going away while jobs run, with the real worker process: one outage, one pair of lines."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from devtools.redis_server import free_port, start_redis_server
from tests.acceptance.processes import cluster
from tests.acceptance.test_worker_recovery import (
    start_ready,
    started_times,
    wait_for_log,
    worker_env,
)
from tests.integration.worker_harness import arq_pool, dispatch, wait_final, wait_status
from throttler.db import SessionFactory
from throttler.settings import Settings

# Jobs that end while Redis is away: ARQ's last Redis step for each of them fails.
JOBS_IN_OUTAGE = 4
# From Redis answering again to a new job's start.
PICKUP_LIMIT_S = 1.0

pytestmark = pytest.mark.slow


async def test_outage_with_running_jobs_is_one_outage_and_work_resumes_at_once(
    settings: Settings, sessions: SessionFactory, tmp_path: Path
) -> None:
    port = free_port()
    settings = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    redis = start_redis_server(port=port, workdir=tmp_path / "redis")
    try:
        with cluster(env=worker_env(settings), log_dir=tmp_path) as running:
            worker = await start_ready(running, "worker")
            async with arq_pool(settings) as pool:
                job_ids = [
                    await dispatch(
                        sessions,
                        pool,
                        settings,
                        name="non_blocking_long_running_task",
                        # Staggered: each ends in a round of announcements of its own.
                        payload={"duration": 2 + index},
                    )
                    for index in range(JOBS_IN_OUTAGE)
                ]
            for job_id in job_ids:
                await wait_status(sessions, job_id, "running")

            # Redis goes away while the jobs run; they end (in the database) meanwhile.
            redis.stop()
            await wait_for_log(worker, "worker.redis_unavailable")
            for job_id in job_ids:
                assert (await wait_final(sessions, job_id)).status == "succeeded"

            redis = start_redis_server(port=port, workdir=tmp_path / "redis")
            answering_at = time.time()
            async with arq_pool(settings) as pool:
                greeting_id = await dispatch(
                    sessions, pool, settings, name="greeting", payload={"name": "after"}
                )
                greeting = await wait_final(sessions, greeting_id)
                assert greeting.status == "succeeded", worker.output()
                # Work goes on: a second greeting, well after the restart.
                second_id = await dispatch(
                    sessions, pool, settings, name="greeting", payload={"name": "later"}
                )
                assert (await wait_final(sessions, second_id)).status == "succeeded"
            assert worker.stop() == 0, worker.output()
    finally:
        redis.stop()

    [started_at] = await started_times(sessions, greeting_id)
    pickup_s = started_at - answering_at
    log = worker.output()
    unavailable = log.count("worker.redis_unavailable")
    restored = log.count("worker.redis_restored")
    print(f"pickup {pickup_s:.3f}s after Redis answered; {unavailable=} {restored=}")
    # One line as Redis goes and one as it is back, not one per job that ended meanwhile.
    assert (unavailable, restored) == (1, 1), log[-5000:]
    # Nor one per round of finished tasks that could not be announced.
    assert log.count("task.finish_not_announced") == 1, log[-5000:]
    assert pickup_s < PICKUP_LIMIT_S, log[-5000:]
    assert "Traceback" not in log
