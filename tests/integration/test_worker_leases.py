"""In-progress leases: short, renewed while a job runs, so only a dead worker's jobs move."""

from __future__ import annotations

from arq.constants import in_progress_key_prefix

from tests.integration.worker_harness import arq_pool, dispatch, running_worker, wait_final
from tests.support import wait_for
from throttler.db import SessionFactory
from throttler.settings import Settings
from worker.leases import LEASE_S


async def test_a_job_longer_than_its_lease_runs_once_beside_an_idle_worker(
    settings: Settings, sessions: SessionFactory
) -> None:
    duration_s = int(LEASE_S) + 2
    async with arq_pool(settings) as pool, running_worker(settings), running_worker(settings):
        task_id = await dispatch(
            sessions,
            pool,
            settings,
            name="non_blocking_long_running_task",
            payload={"duration": duration_s},
        )
        key = in_progress_key_prefix + task_id

        async def leased() -> bool:
            ttl_ms = int(await pool.pttl(key))
            return 0 < ttl_ms <= LEASE_S * 1000

        await wait_for(leased, message="the in-progress lease")
        task = await wait_final(sessions, task_id, timeout_s=30)

        async def released() -> bool:
            return not await pool.exists(key)

        # ARQ deletes the key as it finishes the job, just after our outcome is written:
        # well before the lease would lapse on its own.
        await wait_for(released, timeout_s=LEASE_S / 2, message="the lease to be released")

    assert task.status == "succeeded"
    # Renewed past its first TTL: the idle worker never took the job.
    assert task.attempts == 1
