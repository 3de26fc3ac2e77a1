"""The worker when its role's writes are revoked: no outcome dropped, no task run twice.

The worker runs as a PostgreSQL role that owns nothing (a superuser ignores REVOKE).
Tasks finish while INSERT and UPDATE are revoked: their outcomes are retried until the
GRANT, then each lands once; a task picked up meanwhile is not run (its start cannot be
written) until then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import ClassVar

import pytest

from devtools.postgres_role import AppRole, create_app_role
from tests.integration.worker_harness import (
    arq_pool,
    dispatch,
    fast_retries,
    running_worker,
    wait_final,
    wait_status,
)
from tests.support import event_history, wait_for
from throttler.catalog import BLOCKING_LONG_RUNNING, GREETING, DurationInput, GreetingInput
from throttler.db import SessionFactory
from throttler.settings import Settings
from worker.taskkit import Resources, RetriableTask, SideEffectingTask
from worker.tasks.greeting import GreetingOutput
from worker.tasks.long_running import DurationOutput

# A side-effecting task of its own name (the worker has one function per name).
SIDE_EFFECTING = dataclasses.replace(BLOCKING_LONG_RUNNING, side_effecting=True, timeout_s=None)


class Gate:
    """Held tasks wait here until the test opens it; every run is counted by its input."""

    opened: ClassVar[asyncio.Event]
    runs: ClassVar[Counter[str]] = Counter()


class HeldGreeting(RetriableTask[GreetingInput, GreetingOutput], spec=GREETING):
    output_model = GreetingOutput

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        Gate.runs[params.name] += 1
        await Gate.opened.wait()
        return GreetingOutput(message=f"Hello, {params.name}!")


class HeldLaunch(SideEffectingTask[DurationInput, DurationOutput], spec=SIDE_EFFECTING):
    output_model = DurationOutput

    async def run(self, resources: Resources, params: DurationInput) -> DurationOutput:
        Gate.runs[f"launch-{params.duration:g}"] += 1
        await Gate.opened.wait()
        return DurationOutput(duration=params.duration)


@pytest.fixture
async def app_role(database_url: str) -> AsyncIterator[AppRole]:
    role = await create_app_role(database_url)
    try:
        yield role
    finally:
        await role.drop()


def persist_lines(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.getMessage() == message]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.postgres
async def test_outcomes_finished_while_writes_are_revoked_land_once_after_the_grant(
    settings: Settings,
    sessions: SessionFactory,
    app_role: AppRole,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The runner's INFO first: each call sets the capturing handler's level too.
    caplog.set_level(logging.INFO, logger="worker.taskkit.runner")
    caplog.set_level(logging.DEBUG, logger="worker.taskkit.persist")
    Gate.opened = asyncio.Event()
    Gate.runs.clear()
    as_role = fast_retries(settings, database_url=app_role.url, database_timeout_s=1.0)
    async with (
        arq_pool(as_role) as pool,
        running_worker(as_role, tasks=[HeldGreeting, HeldLaunch]),
    ):
        held = [
            await dispatch(sessions, pool, as_role, name="greeting", payload={"name": f"g{i}"})
            for i in range(4)
        ] + [
            await dispatch(
                sessions, pool, as_role, name=SIDE_EFFECTING.name, payload={"duration": i + 1}
            )
            for i in range(2)
        ]
        for task_id in held:
            await wait_status(sessions, task_id, "running", timeout_s=30)

        await app_role.revoke_writes()
        Gate.opened.set()

        def retried(task_id: str) -> int:
            return sum(
                1
                for record in persist_lines(caplog, "task.write_retry")
                if getattr(record, "fields", {}).get("task_id") == task_id
            )

        async def all_retried_twice() -> bool:
            return all(retried(task_id) >= 2 for task_id in held)

        await wait_for(all_retried_twice, timeout_s=60, message="every outcome to fail twice")
        # Picked up meanwhile: its start cannot be written, so it does not run yet.
        late = await dispatch(sessions, pool, as_role, name="greeting", payload={"name": "late"})

        async def late_refused() -> bool:
            return any(
                getattr(record, "fields", {}).get("task_id") == late
                for record in persist_lines(caplog, "task.start_failed")
            )

        await wait_for(late_refused, timeout_s=60, message="the late task's start to fail")
        assert Gate.runs["late"] == 0

        await app_role.grant_writes()
        finished = [await wait_final(sessions, task_id, timeout_s=60) for task_id in [*held, late]]

    assert [(task.status, task.attempts) for task in finished] == [("succeeded", 1)] * 7
    # Each ran once: no outcome was dropped and no task ran again.
    assert Gate.runs == Counter(
        {"g0": 1, "g1": 1, "g2": 1, "g3": 1, "launch-1": 1, "launch-2": 1, "late": 1}
    )
    async with sessions() as session:
        for task in finished:
            assert await event_history(session, task.id) == [
                "submitted",
                "queued",
                "started",
                "succeeded",
            ]
    # One line as the outcome writes start failing, one as they are all written.
    outage = [
        record.getMessage()
        for record in caplog.records
        if record.name == "worker.taskkit.persist" and record.levelno >= logging.INFO
    ]
    assert outage == ["task.write_failing", "task.write_recovered"]
    assert "permission denied" in str(
        getattr(persist_lines(caplog, "task.write_failing")[0], "fields", {})
    )
