"""Group commit of job writes: batching must never lose, mix up or reorder a job's writes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.test_worker_outages import write_lock
from tests.integration.worker_harness import (
    arq_pool,
    dispatch,
    enqueue,
    fast_retries,
    job_id_of,
    queue_task,
    running_worker,
    wait_final,
    wait_status,
)
from tests.support import event_history, wait_for
from throttler.db import SessionFactory, create_engine
from throttler.models import TaskEvent, utcnow
from throttler.retry import Backoff
from throttler.settings import Settings
from throttler.statuses import EventKind
from throttler.store.attempts import Outcome, open_attempts
from worker.taskkit.persist import retry_until_written
from worker.taskkit.status_writer import StatusWriter

SUCCESS_EVENTS = ["submitted", "queued", "started", "succeeded"]


@pytest.fixture
async def writer(settings: Settings, engine: AsyncEngine) -> AsyncIterator[StatusWriter]:
    status = StatusWriter(open_attempts(settings, engine), worker_id="test-worker")
    status.start_writing()
    yield status
    await status.close()


def succeeded(task_id: str, *, result: dict[str, Any], attempt: int = 1) -> Outcome:
    return Outcome(
        task_id=task_id,
        event=EventKind.SUCCEEDED,
        attempt=attempt,
        worker_id="test-worker",
        now=utcnow(),
        result=result,
    )


def failed_tries(caplog: pytest.LogCaptureFixture, task_id: str) -> int:
    return sum(
        1
        for record in caplog.records
        if record.getMessage() == "task.write_retry"
        and getattr(record, "fields", {}).get("task_id") == task_id
    )


async def test_many_concurrent_jobs_each_get_their_own_result_and_events(
    settings: Settings, sessions: SessionFactory
) -> None:
    settings = settings.model_copy(update={"worker_concurrency": 40})
    names = [f"job-{index}" for index in range(120)]
    task_ids = [
        await queue_task(sessions, name="greeting", payload={"name": name}) for name in names
    ]
    async with arq_pool(settings) as pool, running_worker(settings):
        # All jobs in the queue at once, so that many run (and write) together.
        jobs = [await job_id_of(sessions, task_id) for task_id in task_ids]
        await asyncio.gather(*(enqueue(pool, settings, name="greeting", job_id=j) for j in jobs))
        tasks = [await wait_final(sessions, task_id, timeout_s=60) for task_id in task_ids]

    for name, task in zip(names, tasks, strict=True):
        assert task.status == "succeeded"
        assert task.result == {"message": f"Hello, {name}!"}
        assert task.attempts == 1
        assert task.started_at is not None
        assert task.finished_at is not None
        assert task.finished_at >= task.started_at
    async with sessions() as session:
        for task_id in task_ids:
            assert await event_history(session, task_id) == SUCCESS_EVENTS
        details = (
            await session.scalars(
                select(TaskEvent.detail).where(
                    TaskEvent.task_id.in_(task_ids), TaskEvent.event.in_(["started", "succeeded"])
                )
            )
        ).all()
    assert len(details) == 2 * len(task_ids)
    assert all(detail["attempt"] == 1 for detail in details)


async def test_a_batch_that_fails_on_an_outage_is_retried_and_written(
    settings: Settings, sessions: SessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="worker.taskkit.persist")
    # Each try then fails fast (busy timeout, or statement timeout on PostgreSQL).
    settings = fast_retries(settings, database_timeout_s=0.05, worker_concurrency=20)
    async with arq_pool(settings) as pool, running_worker(settings):
        task_ids = [
            await dispatch(
                sessions,
                pool,
                settings,
                name="non_blocking_long_running_task",
                payload={"duration": 1},
            )
            for _ in range(8)
        ]
        for task_id in task_ids:
            await wait_status(sessions, task_id, "running")
        # The eight outcomes arrive while the database refuses every batch.
        async with write_lock(settings):

            async def all_refused_twice() -> bool:
                return all(failed_tries(caplog, task_id) >= 2 for task_id in task_ids)

            await wait_for(all_refused_twice, timeout_s=30, message="every outcome to fail twice")
        tasks = [await wait_final(sessions, task_id, timeout_s=30) for task_id in task_ids]

    for task in tasks:
        assert task.status == "succeeded"
        assert task.result == {"duration": 1}
        assert task.attempts == 1
    async with sessions() as session:
        for task_id in task_ids:
            assert await event_history(session, task_id) == SUCCESS_EVENTS


async def test_one_bad_write_fails_alone_and_the_rest_of_its_batch_is_written(
    sessions: SessionFactory, writer: StatusWriter
) -> None:
    task_ids = [
        await queue_task(sessions, name="greeting", payload={"name": f"n{index}"})
        for index in range(6)
    ]
    attempts = await asyncio.gather(*(writer.start(task_id=task_id) for task_id in task_ids))
    assert [attempt.attempt if attempt else None for attempt in attempts] == [1] * 6

    # A set is not JSON: this result cannot be stored, whatever the database.
    bad_result: dict[str, Any] = {"message": {"not", "json"}}
    outcomes = [
        succeeded(task_id, result=bad_result if index == 2 else {"message": task_id})
        for index, task_id in enumerate(task_ids)
    ]
    results = await asyncio.gather(
        *(writer.finish(outcome) for outcome in outcomes), return_exceptions=True
    )

    assert isinstance(results[2], Exception)
    assert [result for index, result in enumerate(results) if index != 2] == [True] * 5
    async with sessions() as session:
        for index, task_id in enumerate(task_ids):
            history = await event_history(session, task_id)
            assert history == (["submitted", "queued", "started"] if index == 2 else SUCCESS_EVENTS)


async def test_a_start_and_an_outcome_of_one_task_are_written_in_order(
    sessions: SessionFactory, writer: StatusWriter
) -> None:
    task_id = await queue_task(sessions, name="greeting", payload={"name": "x"})
    # Handed over in the same instant: they must not share a batch, start first.
    attempt, written = await asyncio.gather(
        writer.start(task_id=task_id), writer.finish(succeeded(task_id, result={"m": 1}))
    )

    assert attempt is not None
    assert attempt.attempt == 1
    assert written is True
    async with sessions() as session:
        assert await event_history(session, task_id) == SUCCESS_EVENTS


async def test_writes_for_final_tasks_are_refused_per_task(
    sessions: SessionFactory, writer: StatusWriter
) -> None:
    done_id, open_id = [
        await queue_task(sessions, name="greeting", payload={"name": name})
        for name in ("done", "open")
    ]
    await writer.start(task_id=done_id)
    assert await writer.finish(succeeded(done_id, result={"m": "first"}))

    # In one batch: a start and an outcome for a final task, and a start for an open one.
    late_start, late_outcome, fresh_start = await asyncio.gather(
        writer.start(task_id=done_id),
        writer.finish(succeeded(open_id, result={"m": "too early"})),
        writer.start(task_id="no-such-task"),
    )
    assert late_start is None
    assert fresh_start is None
    # open_id was never started: only a task running on the outcome's attempt takes one.
    assert late_outcome is False
    async with sessions() as session:
        assert await event_history(session, done_id) == SUCCESS_EVENTS
        assert await event_history(session, open_id) == ["submitted", "queued"]


async def test_outcomes_handed_to_the_writer_during_an_outage_are_all_written(
    settings: Settings,
    sessions: SessionFactory,
    engine: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="worker.taskkit.persist")
    settings = settings.model_copy(update={"database_timeout_s": 0.05})
    # On PostgreSQL a try ends at the engine's command timeout (twice database_timeout_s):
    # the writer gets an engine of its own with a short one, not the shared engine's 10 s.
    own_engine = (
        None
        if settings.is_sqlite
        else create_engine(settings.model_copy(update={"database_timeout_s": 0.5}))
    )
    status = StatusWriter(open_attempts(settings, own_engine or engine), worker_id="test-worker")
    status.start_writing()
    try:
        task_ids = [
            await queue_task(sessions, name="greeting", payload={"name": f"n{index}"})
            for index in range(5)
        ]
        for task_id in task_ids:
            assert await status.start(task_id=task_id) is not None
        async with write_lock(settings):
            writes = [
                asyncio.create_task(
                    retry_until_written(
                        finisher(status, task_id),
                        task_id=task_id,
                        what="succeeded",
                        backoff=Backoff(first_s=0.01, max_s=0.05),
                        shielded=False,
                    )
                )
                for task_id in task_ids
            ]

            async def all_refused_twice() -> bool:
                return all(failed_tries(caplog, task_id) >= 2 for task_id in task_ids)

            await wait_for(all_refused_twice, timeout_s=30, message="every outcome to fail twice")
            assert not any(write.done() for write in writes)
        assert await asyncio.gather(*writes) == [True] * 5
    finally:
        await status.close()
        if own_engine is not None:
            await own_engine.dispose()
    async with sessions() as session:
        for task_id in task_ids:
            assert await event_history(session, task_id) == SUCCESS_EVENTS


def finisher(status: StatusWriter, task_id: str) -> Callable[[], Awaitable[bool]]:
    """One try at writing the task's success through ``status``."""

    async def once() -> bool:
        return await status.finish(succeeded(task_id, result={"m": task_id}))

    return once


async def test_idle_writer_refuses_writes_once_closed(writer: StatusWriter) -> None:
    await writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        await writer.start(task_id="t")


async def test_stop_waits_for_writes_already_handed_over(
    sessions: SessionFactory, writer: StatusWriter
) -> None:
    task_id = await queue_task(sessions, name="greeting", payload={"name": "x"})
    assert await writer.start(task_id=task_id) is not None
    finishing = asyncio.create_task(writer.finish(succeeded(task_id, result={"m": 1})))
    await asyncio.sleep(0)  # one turn of the loop: the outcome is handed over, not written
    await writer.close()
    assert await finishing is True
