"""Cancel of running attempts with a worker in this process, on SQLite and PostgreSQL.

A blocking thread cannot be interrupted: its job ends at once (the worker slot and the
in-flight slot are free), the thread runs on, and its outcome is discarded. A running
side-effecting task is left running unless the cancel forces it. Under an in-flight cap
of 1, cancelling the running task lets the relay release the next one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from typing import ClassVar

import httpx
import pytest
from arq.connections import ArqRedis
from arq.jobs import Job, JobResult

from tests.integration.cancel_support import api_with_side_effecting
from tests.integration.conftest import ApiClientFactory
from tests.integration.worker_harness import (
    arq_pool,
    dispatch,
    job_id_of,
    load_task,
    running_relay,
    running_worker,
    wait_final,
    wait_status,
)
from tests.support import event_history, wait_for
from throttler.aborts import ABORT_KEY
from throttler.catalog import BLOCKING_LONG_RUNNING, NON_BLOCKING_LONG_RUNNING, DurationInput
from throttler.db import SessionFactory
from throttler.settings import Settings
from worker.taskkit import BlockingTask, Resources, SideEffectingTask
from worker.tasks.long_running import DurationOutput

API = "/api/v1"
THREAD_TIMEOUT_S = 15.0


class GatedBlockingTask(BlockingTask[DurationInput, DurationOutput], spec=BLOCKING_LONG_RUNNING):
    """Blocks its thread until the test opens the gate; says when the thread returns."""

    output_model = DurationOutput
    entered: ClassVar[threading.Event] = threading.Event()
    gate: ClassVar[threading.Event] = threading.Event()
    returned: ClassVar[threading.Event] = threading.Event()

    def run_blocking(self, params: DurationInput) -> DurationOutput:
        self.entered.set()
        assert self.gate.wait(THREAD_TIMEOUT_S)
        self.returned.set()
        return DurationOutput(duration=params.duration)


SENDS = dataclasses.replace(NON_BLOCKING_LONG_RUNNING, side_effecting=True)


class SideEffectingSleep(SideEffectingTask[DurationInput, DurationOutput], spec=SENDS):
    """A side-effecting task that takes ``duration`` seconds on the event loop."""

    output_model = DurationOutput

    async def run(self, resources: Resources, params: DurationInput) -> DurationOutput:
        await asyncio.sleep(params.duration)
        return DurationOutput(duration=params.duration)


async def _aborted(pool: ArqRedis, settings: Settings, job_id: str) -> JobResult:
    """Wait until ARQ ended the job as aborted; return its result."""

    async def ended() -> JobResult | None:
        return await Job(job_id, pool, _queue_name=settings.arq_queue_name).result_info()

    result = await wait_for(ended, timeout_s=15, message=f"job {job_id} to end")
    assert result is not None
    assert not result.success
    assert type(result.result).__name__ == "CancelledError"
    return result


async def test_a_blocking_threads_outcome_is_discarded(
    settings: Settings,
    sessions: SessionFactory,
    api_client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="worker.taskkit.runner")
    GatedBlockingTask.entered.clear()
    GatedBlockingTask.gate.clear()
    GatedBlockingTask.returned.clear()
    try:
        async with arq_pool(settings) as pool, running_worker(settings, tasks=[GatedBlockingTask]):
            task_id = await dispatch(
                sessions, pool, settings, name="blocking_long_running_task", payload={"duration": 1}
            )
            job_id = await job_id_of(sessions, task_id)
            await wait_status(sessions, task_id, "running")

            response = await api_client.post(f"{API}/tasks/{task_id}/cancel")
            assert response.status_code == 200, response.text
            # The job ends while its thread is still blocked: the worker slot is free.
            await _aborted(pool, settings, job_id)
            assert GatedBlockingTask.entered.is_set()
            assert not GatedBlockingTask.returned.is_set()

            # The thread runs on to its end; what it returns is dropped.
            GatedBlockingTask.gate.set()

            async def thread_returned() -> bool:
                return GatedBlockingTask.returned.is_set()

            await wait_for(thread_returned, message="the thread to return")
            # Nothing wrote its result: the coroutine awaiting it was cancelled with the job.
            task = await load_task(sessions, task_id)
    finally:
        GatedBlockingTask.gate.set()

    assert task.status == "cancelled"
    assert task.result is None
    async with sessions() as session:
        assert await event_history(session, task_id) == [
            "submitted",
            "queued",
            "started",
            "cancelled",
        ]
    interrupted = [r for r in caplog.records if r.getMessage().startswith("task.interrupted")]
    assert len(interrupted) == 1
    logged = vars(interrupted[0])["fields"]  # throttler.logs.fields
    assert logged["task_id"] == task_id
    assert "thread runs on" in logged["outcome"]


async def test_a_running_side_effecting_task_runs_on_unless_the_cancel_forces_it(
    settings: Settings, sessions: SessionFactory, redis: object
) -> None:
    async with (
        arq_pool(settings) as pool,
        running_worker(settings, tasks=[SideEffectingSleep]),
        api_with_side_effecting(settings, side_effecting=frozenset({SENDS.name})) as client,
    ):
        task_id = await dispatch(
            sessions, pool, settings, name=SENDS.name, payload={"duration": 60}
        )
        job_id = await job_id_of(sessions, task_id)
        await wait_status(sessions, task_id, "running")

        refused = await client.post(f"{API}/tasks/{task_id}/cancel")
        assert refused.status_code == 409, refused.text
        assert "force" in refused.json()["detail"]
        assert await pool.zcard(ABORT_KEY) == 0
        assert (await load_task(sessions, task_id)).status == "running"

        forced = await client.post(f"{API}/tasks/{task_id}/cancel?force=true")
        assert forced.status_code == 200, forced.text
        await _aborted(pool, settings, job_id)

    task = await load_task(sessions, task_id)
    assert task.status == "cancelled"
    async with sessions() as session:
        # Not requeued, not failed: the cancel is the outcome.
        assert await event_history(session, task_id) == [
            "submitted",
            "queued",
            "started",
            "cancelled",
        ]


async def test_cancelling_the_running_task_frees_its_inflight_slot(
    settings: Settings, sessions: SessionFactory, make_api_client: ApiClientFactory
) -> None:
    settings = settings.model_copy(update={"relay_max_inflight": 1})
    async with (
        make_api_client(settings) as client,
        arq_pool(settings) as pool,
        running_relay(settings, sessions, pool),
        running_worker(settings),
    ):
        long = await client.post(
            f"{API}/task/non_blocking_long_running_task", json={"duration": 120}
        )
        long_id = long.json()["task_id"]
        await wait_status(sessions, long_id, "running", timeout_s=30)
        greeting = await client.post(f"{API}/task/greeting", json={"name": "next"})
        next_id = greeting.json()["task_id"]

        async def held_back() -> bool:
            view = (await client.get(f"{API}/tasks/{next_id}")).json()
            return bool(view["status"] == "pending")

        # The cap holds it back while the long task runs (it stays pending); without the
        # cancel freeing the slot at once, it would wait the long task's two minutes.
        assert await held_back()

        response = await client.post(f"{API}/tasks/{long_id}/cancel")
        assert response.status_code == 200, response.text
        task = await wait_final(sessions, next_id, timeout_s=30)

    assert task.status == "succeeded"
    assert (await load_task(sessions, long_id)).status == "cancelled"
