"""The attempts' fast path writes exactly the reference's rows (SQLite's; PostgreSQL runs
the reference itself, which this checks too), outbox rows of retries included.

The same tasks, in the same states, get the same starts and outcomes through
``CoreAttempts`` and through ``open_attempts``; every column of every row of ``tasks``
and ``task_events`` (ids and times included) is compared as the database holds it, and
so are the attempts started and the outcomes recorded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.store.test_intake_parity import NOW, TABLES, rows_of_both, submissions
from throttler.job_ids import Dispatch
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus
from throttler.store.attempts import (
    OUTBOX,
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
    """Submitted tasks: queued (released at NOW), running and already final.

    The relay released every outbox row but that of the third task (a relay that died
    before releasing it): its retry must replace the row, one per task.
    """
    ids = [task.task_id for task in tasks]
    async with engine.begin() as connection:
        await insert_submissions(connection, tasks)
        await connection.execute(delete(OUTBOX).where(OUTBOX.c.task_id != ids[2]))
        await connection.execute(
            update(TASKS).values(status=TaskStatus.QUEUED.value, queued_at=NOW)
        )
        await connection.execute(
            update(TASKS)
            .where(TASKS.c.id == ids[3])
            .values(status=TaskStatus.RUNNING.value, attempts=1, started_at=NOW)
        )
        await connection.execute(
            update(TASKS)
            .where(TASKS.c.id == ids[4])
            .values(status=TaskStatus.SUCCEEDED.value, attempts=1, finished_at=NOW)
        )
    return ids


async def _release_again(engine: AsyncEngine, task_id: str) -> None:
    """What a relay does with a retried task: lease it at RELEASED_AGAIN, drop its row."""
    async with engine.begin() as connection:
        await connection.execute(delete(OUTBOX).where(OUTBOX.c.task_id == task_id))
        await connection.execute(
            update(TASKS)
            .where(TASKS.c.id == task_id)
            .values(status=TaskStatus.QUEUED.value, queued_at=RELEASED_AGAIN)
        )


RELEASED_AGAIN = NOW + timedelta(seconds=5)


def _outcome(task_id: str, event: EventKind, *, attempt: int = 1, **values: object) -> Outcome:
    return Outcome(
        task_id=task_id,
        event=event,
        attempt=attempt,
        worker_id="worker-1",
        now=NOW + timedelta(seconds=2, microseconds=7),
        **values,  # type: ignore[arg-type]
    )


def _on(task_id: str, at: datetime) -> Dispatch:
    return Dispatch.of(task_id, queued_at=at)


async def _write_all(
    engine: AsyncEngine, attempts: Attempts, ids: Sequence[str]
) -> list[AttemptWrites]:
    started_at = NOW + timedelta(seconds=1)
    stale = NOW - timedelta(microseconds=1)
    try:
        return [
            # Starts: queued on the job's dispatch (or a bare id); running on it (a
            # re-delivery after a worker died: orphaned); final, on another dispatch,
            # unknown: none of those.
            await attempts.write(
                starts=[
                    _on(ids[0], NOW),
                    Dispatch(task_id=ids[1]),
                    _on(ids[2], NOW),
                    _on(ids[3], NOW),
                    _on(ids[4], NOW),
                    _on(ids[5], stale),
                    Dispatch(task_id="no-such-task"),
                ],
                outcomes=[],
                worker_id="worker-1",
                now=started_at,
            ),
            # Outcomes of every kind, one for a final task and one for a task that never
            # started (both discarded: only a running task takes an outcome), with starts
            # in the same batch.
            await attempts.write(
                starts=[_on(ids[5], NOW), _on(ids[6], NOW)],
                outcomes=[
                    _outcome(ids[0], EventKind.SUCCEEDED, result={"message": "é ✓", "n": [1]}),
                    _outcome(ids[1], EventKind.FAILED, error="ValueError: no"),
                    _outcome(ids[2], EventKind.RETRYING, error="again", defer_s=0.25, tries_base=0),
                    _outcome(
                        ids[3],
                        EventKind.REQUEUED,
                        error="interrupted: the worker stopped",
                        reason="worker_stopping",
                    ),
                    _outcome(ids[4], EventKind.SUCCEEDED, result={"late": True}),
                    _outcome(ids[7], EventKind.FAILED, error="never started"),
                ],
                worker_id="worker-2",
                now=started_at + timedelta(seconds=3),
            ),
            # The retried task's old job starts nothing (back in the outbox) ...
            await attempts.write(
                starts=[_on(ids[2], NOW)], outcomes=[], worker_id="worker-1", now=started_at
            ),
            # ... nor once released again; the new dispatch's job starts it.
            await _released_then(
                engine,
                ids[2],
                attempts.write(
                    starts=[_on(ids[2], NOW), _on(ids[3], NOW - timedelta(seconds=1))],
                    outcomes=[],
                    worker_id="worker-1",
                    now=started_at,
                ),
            ),
            await attempts.write(
                starts=[_on(ids[2], RELEASED_AGAIN)],
                outcomes=[],
                worker_id="worker-1",
                now=started_at,
            ),
            await attempts.write(
                starts=[],
                # The second attempt's outcome (an outcome names its attempt).
                outcomes=[_outcome(ids[2], EventKind.SUCCEEDED, attempt=2, result={})],
                worker_id="worker-1",
                now=started_at,
            ),
        ]
    finally:
        await attempts.close()


async def _released_then(
    engine: AsyncEngine, task_id: str, write: Awaitable[AttemptWrites]
) -> AttemptWrites:
    await _release_again(engine, task_id)
    return await write


async def test_attempts_override_writes_the_reference_rows(
    settings: Settings, engine: AsyncEngine
) -> None:
    tasks = [task for request in submissions() for task in request]

    async def run(override: bool) -> list[AttemptWrites]:
        ids = await _tasks_in_every_state(engine, tasks)
        attempts = open_attempts(settings, engine) if override else CoreAttempts(engine)
        return await _write_all(engine, attempts, ids)

    reference, override, (reference_writes, override_writes) = await rows_of_both(engine, run)

    assert isinstance(reference_writes, list)
    first, second, stale, released, third, fourth = reference_writes
    # The running task's job delivered again: orphaned (its worker died), not restarted.
    assert sorted(first.started) == sorted(task.task_id for task in tasks[:4])
    assert sorted((a.orphaned, a.attempt) for a in first.started.values()) == [
        (False, 1),
        (False, 1),
        (False, 1),
        (True, 1),
    ]
    assert len(second.started) == 2
    assert len(second.recorded) == 4
    assert not stale.started
    assert not released.started
    assert [attempt.attempt for attempt in third.started.values()] == [2]
    assert fourth.recorded
    events = [row for row in reference["task_events"] if row[3] != EventKind.SUBMITTED.value]
    assert len(events) == 3 + 2 + 4 + 1 + 1
    # The retried and the requeued task each got a new outbox row (the retried task's
    # replaced its leftover one); the relay has since released the retried task's.
    assert len(reference["outbox"]) == 1
    assert set(TABLES) <= set(reference)
    assert override_writes == reference_writes
    assert override == reference
