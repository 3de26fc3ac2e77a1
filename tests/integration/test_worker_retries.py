"""Retries, permanent failures and at-most-once tasks, with test-only task classes.

Test tasks reuse a catalog entry (and so its name and input model), or a variant of it;
each test registers only its own class with the worker it runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
from arq.constants import job_key_prefix, retry_key_prefix
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from tests.integration.worker_harness import (
    arq_pool,
    assert_refused_second_start,
    dispatch,
    enqueue,
    fast_retries,
    job_id_of,
    queue_task,
    running_relay,
    running_worker,
    wait_final,
)
from tests.support import event_history, start_attempt, wait_for
from throttler.catalog import GREETING, GreetingInput
from throttler.db import SessionFactory
from throttler.job_ids import Dispatch
from throttler.models import TaskEvent, utcnow
from throttler.retry import Backoff
from throttler.settings import Settings
from worker.taskkit import PermanentError, Resources, RetriableTask, SideEffectingTask
from worker.taskkit.persist import retry_until_written
from worker.tasks.greeting import GreetingOutput

# The greeting, but run at most once: a test-only variant of the catalog entry.
SIDE_EFFECTING_GREETING = dataclasses.replace(GREETING, side_effecting=True)


class FailsTwice(RetriableTask[GreetingInput, GreetingOutput], spec=GREETING):
    """Raise on the first two calls for a name, then greet."""

    output_model = GreetingOutput
    calls: ClassVar[Counter[str]] = Counter()

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        self.calls[params.name] += 1
        if self.calls[params.name] <= 2:
            raise ConnectionError(f"flaky call {self.calls[params.name]}")
        return GreetingOutput(message=f"Hello, {params.name}!")


class AlwaysFails(RetriableTask[GreetingInput, GreetingOutput], spec=GREETING):
    output_model = GreetingOutput

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        raise ConnectionError("still down")


class RefusesPermanently(RetriableTask[GreetingInput, GreetingOutput], spec=GREETING):
    output_model = GreetingOutput

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        raise PermanentError(f"{params.name} does not exist")


class ReturnsWrongOutput(RetriableTask[GreetingInput, GreetingOutput], spec=GREETING):
    output_model = GreetingOutput

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        # Skip validation, as a buggy task could: the worker must catch it before storing.
        broken: dict[str, Any] = {"message": None}
        return GreetingOutput.model_construct(**broken)


class SendsEmail(SideEffectingTask[GreetingInput, GreetingOutput], spec=SIDE_EFFECTING_GREETING):
    """Pretend to send an email; fail if the name says so."""

    output_model = GreetingOutput
    sent: ClassVar[list[str]] = []

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        self.sent.append(params.name)
        if params.name.startswith("fail"):
            raise ConnectionError("SMTP connection reset")
        return GreetingOutput(message=f"Hello, {params.name}!")


async def test_retriable_failure_is_retried_with_backoff_until_success(
    settings: Settings, sessions: SessionFactory
) -> None:
    settings = fast_retries(settings)
    async with (
        arq_pool(settings) as pool,
        running_relay(settings, sessions, pool),
        running_worker(settings, tasks=[FailsTwice]),
    ):
        task_id = await dispatch(
            sessions,
            pool,
            settings,
            name="greeting",
            payload={"name": f"flaky-{uuid.uuid4().hex}"},
        )
        task = await wait_final(sessions, task_id)

    assert task.status == "succeeded"
    assert task.attempts == 3
    assert task.error is None
    async with sessions() as session:
        # Each retry goes back through the outbox: the relay releases it (queued).
        assert await event_history(session, task_id) == [
            "submitted",
            "queued",
            "started",
            "retrying",
            "queued",
            "started",
            "retrying",
            "queued",
            "started",
            "succeeded",
        ]
        retrying = (
            await session.scalars(
                select(TaskEvent)
                .where(TaskEvent.task_id == task_id, TaskEvent.event == "retrying")
                .order_by(TaskEvent.id)
            )
        ).all()
    assert [event.detail["attempt"] for event in retrying] == [1, 2]
    assert retrying[0].detail["error"] == "ConnectionError: flaky call 1"
    assert 0 < retrying[0].detail["defer_s"] <= 0.05


async def test_retries_stop_at_max_tries(settings: Settings, sessions: SessionFactory) -> None:
    settings = fast_retries(settings, worker_max_tries=3)
    async with (
        arq_pool(settings) as pool,
        running_relay(settings, sessions, pool),
        running_worker(settings, tasks=[AlwaysFails]),
    ):
        task_id = await dispatch(sessions, pool, settings, name="greeting", payload={"name": "x"})
        task = await wait_final(sessions, task_id)

    assert task.status == "failed"
    assert task.attempts == 3
    assert task.error == "ConnectionError: still down (gave up after 3 attempts)"
    async with sessions() as session:
        history = await event_history(session, task_id)
    assert history.count("retrying") == 2
    assert history[-2:] == ["started", "failed"]


async def test_permanent_error_fails_at_once(settings: Settings, sessions: SessionFactory) -> None:
    settings = fast_retries(settings)
    async with arq_pool(settings) as pool, running_worker(settings, tasks=[RefusesPermanently]):
        task_id = await dispatch(
            sessions, pool, settings, name="greeting", payload={"name": "Nobody"}
        )
        task = await wait_final(sessions, task_id)

    assert task.status == "failed"
    assert task.attempts == 1
    assert task.error == "PermanentError: Nobody does not exist"


async def test_invalid_output_is_not_stored(settings: Settings, sessions: SessionFactory) -> None:
    async with arq_pool(settings) as pool, running_worker(settings, tasks=[ReturnsWrongOutput]):
        task_id = await dispatch(sessions, pool, settings, name="greeting", payload={"name": "x"})
        task = await wait_final(sessions, task_id)

    assert task.status == "failed"
    assert task.result is None
    assert task.error is not None
    assert task.error.startswith("invalid output: message:")


async def test_side_effecting_task_is_not_started_twice(
    settings: Settings, sessions: SessionFactory
) -> None:
    task_id = await queue_task(sessions, name="greeting", payload={"name": "twice"})
    # An earlier worker started it and vanished: its outcome is unknown, and ARQ delivers
    # its job again.
    async with sessions.begin() as session:
        first = await start_attempt(session, task_id=task_id, worker_id="gone", now=utcnow())
    assert first is not None
    assert first.attempt == 1

    SendsEmail.sent.clear()
    async with arq_pool(settings) as pool, running_worker(settings, tasks=[SendsEmail]):
        await enqueue(pool, settings, name="greeting", job_id=await job_id_of(sessions, task_id))
        task = await wait_final(sessions, task_id)

    assert SendsEmail.sent == []
    await assert_refused_second_start(sessions, task)


async def test_side_effecting_failure_is_not_retried(
    settings: Settings, sessions: SessionFactory
) -> None:
    SendsEmail.sent.clear()
    settings = fast_retries(settings)
    async with arq_pool(settings) as pool, running_worker(settings, tasks=[SendsEmail]):
        task_id = await dispatch(
            sessions, pool, settings, name="greeting", payload={"name": "fail"}
        )
        task = await wait_final(sessions, task_id)

    assert SendsEmail.sent == ["fail"]
    assert task.status == "failed"
    assert task.attempts == 1
    assert task.error == "ConnectionError: SMTP connection reset (side-effecting task: not retried)"


async def test_outcome_write_is_retried_until_written_logging_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0

    async def flaky_write() -> bool:
        nonlocal calls
        calls += 1
        if calls <= 12:
            raise OperationalError("UPDATE tasks", {}, ConnectionResetError("connection lost"))
        return True

    caplog.set_level(logging.INFO, logger="worker.taskkit.persist")
    assert await retry_until_written(
        flaky_write, task_id="t", what="succeeded", backoff=Backoff(first_s=0.001, max_s=0.004)
    )
    assert calls == 13
    # One line when the trouble starts and one when it ends, not one per try.
    assert [record.getMessage() for record in caplog.records] == [
        "task.write_failing",
        "task.write_recovered",
    ]


async def test_outcome_write_stops_retrying_when_cancelled() -> None:
    tries = 0
    failing = asyncio.Event()

    async def down() -> bool:
        nonlocal tries
        tries += 1
        failing.set()
        raise OperationalError("UPDATE tasks", {}, ConnectionResetError("connection lost"))

    writing = asyncio.create_task(
        retry_until_written(
            down, task_id="t", what="succeeded", backoff=Backoff(first_s=60, max_s=60)
        )
    )
    await failing.wait()
    writing.cancel()
    # Cancelled, not the database error: ARQ re-queues a cancelled job.
    with pytest.raises(asyncio.CancelledError):
        await writing
    assert tries == 1


async def test_job_is_kept_while_the_database_cannot_record_the_start(
    settings: Settings, tmp_path: Path
) -> None:
    broken = fast_retries(
        settings,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'db.sqlite'}",
        database_timeout_s=0.1,
    )
    job_id = Dispatch.of(str(uuid.uuid4()), queued_at=utcnow()).job_id
    async with arq_pool(broken) as pool, running_worker(broken):
        await enqueue(pool, broken, name="greeting", job_id=job_id)

        async def delivered_twice() -> bool:
            tries = await pool.get(retry_key_prefix + job_id)
            return tries is not None and int(tries) >= 2

        await wait_for(delivered_twice, message="ARQ to deliver the job again")
        # Still queued for another try, not finished as failed in ARQ.
        assert await pool.exists(job_key_prefix + job_id)
        assert await pool.zscore(broken.arq_queue_name, job_id) is not None
        # Let the worker stop without the job.
        await pool.zrem(broken.arq_queue_name, job_id)
