"""The attempts' fast path writes exactly the reference's rows (SQLite's; PostgreSQL runs
the reference itself, which this checks too).

The same tasks, in the same states, get the same starts and outcomes through
``CoreAttempts`` and through ``open_attempts``; every column of every row of ``tasks``
and ``task_events`` (ids and times included) is compared as the database holds it, and
so are the attempts started and the outcomes recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.store.test_intake_parity import NOW, TABLES, rows_of_both, submissions
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus
from throttler.store.attempts import (
    TASKS,
    Attempts,
    AttemptWrites,
    CoreAttempts,
    Outcome,
    open_attempts,
)
from throttler.store.intake import insert_submissions
from throttler.submit import NewTask


async def _tasks_in_every_state(engine: AsyncEngine, tasks: Sequence[NewTask]) -> list[str]:
    """Submitted tasks: queued, running (a worker died mid-attempt) and already final."""
    async with engine.begin() as connection:
        await insert_submissions(connection, tasks)
        await connection.execute(
            update(TASKS).values(status=TaskStatus.QUEUED.value, queued_at=NOW)
        )
        await connection.execute(
            update(TASKS)
            .where(TASKS.c.id == tasks[3].task_id)
            .values(status=TaskStatus.RUNNING.value, attempts=1, started_at=NOW)
        )
        await connection.execute(
            update(TASKS)
            .where(TASKS.c.id == tasks[4].task_id)
            .values(status=TaskStatus.SUCCEEDED.value, attempts=1, finished_at=NOW)
        )
    return [task.task_id for task in tasks]


def _outcome(task_id: str, event: EventKind, **values: object) -> Outcome:
    return Outcome(
        task_id=task_id,
        event=event,
        attempt=1,
        worker_id="worker-1",
        now=NOW + timedelta(seconds=2, microseconds=7),
        **values,  # type: ignore[arg-type]
    )


async def _write_all(attempts: Attempts, ids: Sequence[str]) -> list[AttemptWrites]:
    started_at = NOW + timedelta(seconds=1)
    try:
        return [
            # Starts: queued, running again, already final, unknown.
            await attempts.write(
                starts=[ids[0], ids[1], ids[2], ids[3], ids[4], "no-such-task"],
                outcomes=[],
                worker_id="worker-1",
                now=started_at,
            ),
            # Outcomes of every kind, one for a final task, with starts in the same batch.
            await attempts.write(
                starts=[ids[5], ids[6]],
                outcomes=[
                    _outcome(ids[0], EventKind.SUCCEEDED, result={"message": "é ✓", "n": [1]}),
                    _outcome(ids[1], EventKind.FAILED, error="ValueError: no"),
                    _outcome(ids[2], EventKind.RETRYING, error="again", defer_s=0.25),
                    _outcome(ids[4], EventKind.SUCCEEDED, result={"late": True}),
                    _outcome(ids[7], EventKind.FAILED, error="never started"),
                ],
                worker_id="worker-2",
                now=started_at + timedelta(seconds=3),
            ),
            # The retried task starts again, and succeeds in a batch of its own.
            await attempts.write(
                starts=[ids[2]], outcomes=[], worker_id="worker-1", now=started_at
            ),
            await attempts.write(
                starts=[],
                outcomes=[_outcome(ids[2], EventKind.SUCCEEDED, result={})],
                worker_id="worker-1",
                now=started_at,
            ),
        ]
    finally:
        await attempts.close()


async def test_attempts_override_writes_the_reference_rows(
    settings: Settings, engine: AsyncEngine
) -> None:
    tasks = [task for request in submissions() for task in request]

    async def run(override: bool) -> list[AttemptWrites]:
        ids = await _tasks_in_every_state(engine, tasks)
        attempts = open_attempts(settings, engine) if override else CoreAttempts(engine)
        return await _write_all(attempts, ids)

    reference, override, (reference_writes, override_writes) = await rows_of_both(engine, run)

    assert isinstance(reference_writes, list)
    first, second, third, fourth = reference_writes
    assert sorted(attempt.attempt for attempt in first.started.values()) == [1, 1, 1, 2]
    assert len(second.started) == 2
    assert len(second.recorded) == 4
    assert third.started
    assert fourth.recorded
    events = [row for row in reference["task_events"] if row[3] != EventKind.SUBMITTED.value]
    assert len(events) == 4 + 2 + 4 + 1 + 1
    assert set(TABLES) <= set(reference)
    assert override_writes == reference_writes
    assert override == reference
