"""In-progress leases: short, renewed while a job runs, so only a dead worker's jobs move."""

from __future__ import annotations

from arq.constants import in_progress_key_prefix

from tests.integration.worker_harness import (
    arq_pool,
    dispatch,
    enqueue,
    job_id_of,
    load_task,
    queue_task,
    running_worker,
    wait_final,
)
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
        key = in_progress_key_prefix + await job_id_of(sessions, task_id)

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


async def test_pickup_leaves_a_job_whose_in_progress_key_another_worker_holds(
    settings: Settings, sessions: SessionFactory
) -> None:
    async with arq_pool(settings) as pool, running_worker(settings):
        held_id = await queue_task(sessions, name="greeting", payload={"name": "held"})
        held_job = await job_id_of(sessions, held_id)
        # Another worker's lease on the job, taken before it was ever picked up here.
        await pool.psetex(in_progress_key_prefix + held_job, 60_000, b"1")
        await enqueue(pool, settings, name="greeting", job_id=held_job)
        # Queued after the held job: once it is done, the held one was looked at too.
        after_id = await dispatch(sessions, pool, settings, name="greeting", payload={"name": "a"})
        await wait_final(sessions, after_id)
        held = await load_task(sessions, held_id)
        assert held.status == "queued"
        assert held.attempts == 0

        # The other worker's lease ends: the job is taken at the next poll.
        await pool.delete(in_progress_key_prefix + held_job)
        task = await wait_final(sessions, held_id)

    assert task.status == "succeeded"
    assert task.attempts == 1
