"""The catalog's tasks run by a real ARQ worker against real Redis and the test database."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from arq.jobs import Job, JobStatus

from tests.integration.worker_harness import arq_pool, dispatch, running_worker, wait_final
from tests.support import event_history, wait_for
from throttler.catalog import BLOCKING_LONG_RUNNING
from throttler.db import SessionFactory
from throttler.settings import Settings
from worker.taskkit import TaskBase
from worker.tasks import DEFAULT_TASKS
from worker.tasks.long_running import BlockingLongRunningTask

SUCCESS_EVENTS = ["submitted", "queued", "started", "succeeded"]


@pytest.mark.parametrize(
    ("name", "payload", "result"),
    [
        ("greeting", {"name": "Ada"}, {"message": "Hello, Ada!"}),
        ("blocking_long_running_task", {"duration": 1}, {"duration": 1}),
        ("non_blocking_long_running_task", {"duration": 1}, {"duration": 1}),
    ],
)
async def test_task_succeeds_with_result_and_history(
    settings: Settings,
    sessions: SessionFactory,
    name: str,
    payload: dict[str, Any],
    result: dict[str, Any],
) -> None:
    async with arq_pool(settings) as pool, running_worker(settings):
        task_id = await dispatch(sessions, pool, settings, name=name, payload=payload)
        task = await wait_final(sessions, task_id)

    assert task.status == "succeeded"
    assert task.result == result
    assert task.error is None
    assert task.attempts == 1
    assert task.started_at is not None
    assert task.finished_at is not None
    assert task.finished_at >= task.started_at
    async with sessions() as session:
        assert await event_history(session, task_id) == SUCCESS_EVENTS


async def test_blocking_task_does_not_stall_the_worker(
    settings: Settings, sessions: SessionFactory
) -> None:
    async with arq_pool(settings) as pool, running_worker(settings):
        blocking_id = await dispatch(
            sessions, pool, settings, name="blocking_long_running_task", payload={"duration": 3}
        )
        greeting_id = await dispatch(
            sessions, pool, settings, name="greeting", payload={"name": "next"}
        )
        blocking = await wait_final(sessions, blocking_id)
        greeting = await wait_final(sessions, greeting_id)

    assert blocking.status == greeting.status == "succeeded"
    assert blocking.result == {"duration": 3}
    assert greeting.finished_at is not None
    assert blocking.finished_at is not None
    assert greeting.finished_at < blocking.finished_at


class QuickBlockingTask(
    BlockingLongRunningTask, spec=dataclasses.replace(BLOCKING_LONG_RUNNING, timeout_s=0.5)
):
    """The blocking task with a time limit short enough to pass in a test."""


async def test_blocking_task_past_its_timeout_fails_and_worker_keeps_serving(
    settings: Settings, sessions: SessionFactory
) -> None:
    tasks: list[type[TaskBase[Any, Any]]] = [
        QuickBlockingTask,
        *(task for task in DEFAULT_TASKS if task is not BlockingLongRunningTask),
    ]
    async with arq_pool(settings) as pool, running_worker(settings, tasks=tasks):
        slow_id = await dispatch(
            sessions, pool, settings, name="blocking_long_running_task", payload={"duration": 2}
        )
        slow = await wait_final(sessions, slow_id)
        # The thread still sleeps; the worker must serve new jobs regardless.
        greeting_id = await dispatch(
            sessions, pool, settings, name="greeting", payload={"name": "after"}
        )
        greeting = await wait_final(sessions, greeting_id)

    assert slow.status == "failed"
    assert slow.error == "timed out after 0.5s"
    assert slow.attempts == 1
    assert greeting.status == "succeeded"
    async with sessions() as session:
        assert await event_history(session, slow_id) == [
            "submitted",
            "queued",
            "started",
            "failed",
        ]


async def test_invalid_payload_fails_without_retry(
    settings: Settings, sessions: SessionFactory
) -> None:
    async with arq_pool(settings) as pool, running_worker(settings):
        # The API would reject this; the worker validates again from the database.
        task_id = await dispatch(sessions, pool, settings, name="greeting", payload={"name": ""})
        task = await wait_final(sessions, task_id)

    assert task.status == "failed"
    assert task.attempts == 1
    assert task.error is not None
    assert task.error.startswith("invalid input: name:")


async def test_finished_task_is_not_run_again(settings: Settings, sessions: SessionFactory) -> None:
    settings = settings.model_copy(update={"worker_keep_result_s": 0})
    async with arq_pool(settings) as pool, running_worker(settings):
        task_id = await dispatch(sessions, pool, settings, name="greeting", payload={"name": "x"})
        await wait_final(sessions, task_id)

        # A duplicate delivery (e.g. a relay recovering a lease) finds the task final.
        async def redeliver() -> Job | None:
            return await pool.enqueue_job(
                "greeting", _job_id=task_id, _queue_name=settings.arq_queue_name
            )

        job = await wait_for(redeliver, message="ARQ to forget the first job")
        assert job is not None

        async def gone() -> bool:
            return await job.status() == JobStatus.not_found

        await wait_for(gone, message="the duplicate job to run")
        task = await wait_final(sessions, task_id)

    assert task.attempts == 1
    async with sessions() as session:
        assert await event_history(session, task_id) == SUCCESS_EVENTS
