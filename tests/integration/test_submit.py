"""Submission through the store's intake writes exactly the rows SQLAlchemy itself would."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.db import SessionFactory
from throttler.models import OutboxEntry, Task, TaskEvent
from throttler.settings import Settings, sqlite_path
from throttler.statuses import EventKind, TaskStatus
from throttler.store.intake import CoreIntake, Intake, open_intake
from throttler.store.sqlite_intake import SQLiteIntake
from throttler.submit import NewTask, new_task_id

NOW = datetime(2026, 11, 28, 9, 0, 0, 123456, tzinfo=UTC)
PAYLOAD = {"url": "https://bücher.example/ä?q=1", "n": 1.5, "nested": {"ok": True}}


def _task(task_id: str) -> NewTask:
    return NewTask(
        name="download",
        account="acme",
        payload=PAYLOAD,
        created_at=NOW,
        priority=7,
        host="xn--bcher-kva.example",
        run_at=NOW + timedelta(minutes=5),
        task_id=task_id,
    )


async def _insert_with_sqlalchemy(sessions: SessionFactory, task: NewTask) -> None:
    """The reference: SQLAlchemy Core statements with its own type processing."""
    async with sessions.begin() as session:
        await session.execute(
            insert(Task).values(
                id=task.task_id,
                name=task.name,
                account=task.account,
                payload=dict(task.payload),
                host=task.host,
                status=TaskStatus.PENDING,
                priority=task.priority,
                attempts=0,
                created_at=task.created_at,
                run_at=task.run_at,
            )
        )
        await session.execute(insert(OutboxEntry).values(task_id=task.task_id, created_at=NOW))
        await session.execute(
            insert(TaskEvent).values(
                task_id=task.task_id,
                at=NOW,
                event=EventKind.SUBMITTED,
                detail={"account": task.account},
            )
        )


async def _submit(intake: Intake, tasks: Sequence[NewTask]) -> None:
    """One request's tasks, in a transaction of their own, then the intake closed."""
    try:
        await intake.insert(lambda: [intake.prepare(tasks)])
    finally:
        await intake.close()


def _stored(path: str, task_id: str) -> dict[str, list[tuple[object, ...]]]:
    """Every column as SQLite holds it (text, not parsed), ids left out."""
    with sqlite3.connect(path) as connection:
        return {
            "tasks": connection.execute(
                "SELECT name, account, payload, host, status, priority, attempts, result, "
                "error, created_at, run_at, queued_at, started_at, finished_at "
                "FROM tasks WHERE id = ?",
                (task_id,),
            ).fetchall(),
            "outbox": connection.execute(
                "SELECT created_at, claimed_by, claimed_until FROM outbox WHERE task_id = ?",
                (task_id,),
            ).fetchall(),
            "task_events": connection.execute(
                "SELECT at, event, detail FROM task_events WHERE task_id = ?", (task_id,)
            ).fetchall(),
        }


async def test_sqlite_intakes_store_what_sqlalchemy_stores(
    settings: Settings, sessions: SessionFactory, engine: AsyncEngine
) -> None:
    path = sqlite_path(settings.database_url)
    if path is None:
        pytest.skip("the stored text is SQLite's")
    reference, core, thread = new_task_id(), new_task_id(), new_task_id()
    await _insert_with_sqlalchemy(sessions, _task(reference))
    # The store's reference and SQLite's fast path (the API's intake writer's thread).
    await _submit(CoreIntake(engine), [_task(core)])
    await _submit(SQLiteIntake(settings, engine), [_task(thread)])

    expected = _stored(str(path), reference)
    assert all(expected.values()), expected
    assert _stored(str(path), core) == expected
    assert _stored(str(path), thread) == expected


async def test_many_tasks_span_several_statements(
    settings: Settings, sessions: SessionFactory, engine: AsyncEngine
) -> None:
    count = 1234  # past the rows one INSERT statement takes
    tasks = [_task(new_task_id()) for _ in range(count)]
    await _submit(open_intake(settings, engine), tasks)
    async with sessions() as session:
        for model in (Task, OutboxEntry, TaskEvent):
            assert await session.scalar(select(func.count()).select_from(model)) == count


def test_task_ids_are_version_7_uuids_in_creation_order() -> None:
    ids = [new_task_id() for _ in range(1000)]
    parsed = [uuid.UUID(task_id) for task_id in ids]

    assert all(str(value) == task_id for value, task_id in zip(parsed, ids, strict=True))
    assert {value.version for value in parsed} == {7}
    assert {value.variant for value in parsed} == {uuid.RFC_4122}
    assert len(set(ids)) == len(ids)
    # The leading 48 bits are milliseconds: never decreasing.
    stamps = [value.int >> 80 for value in parsed]
    assert stamps == sorted(stamps)


async def _read_back(sessions: SessionFactory, task_id: str) -> dict[str, Any]:
    """Every column as SQLAlchemy reads it, ids left out."""
    async with sessions() as session:
        task = (await session.execute(select(Task).where(Task.id == task_id))).scalar_one()
        outbox = (
            await session.execute(select(OutboxEntry).where(OutboxEntry.task_id == task_id))
        ).scalar_one()
        event = (
            await session.execute(select(TaskEvent).where(TaskEvent.task_id == task_id))
        ).scalar_one()
    return {
        "task": {
            column.key: getattr(task, column.key)
            for column in Task.__table__.columns
            if column.key != "id"
        },
        "outbox": (outbox.created_at, outbox.claimed_by, outbox.claimed_until),
        "event": (event.at, event.event, event.detail),
    }


async def test_intake_stores_what_sqlalchemy_stores(
    settings: Settings, sessions: SessionFactory, engine: AsyncEngine
) -> None:
    reference, submitted = new_task_id(), new_task_id()
    await _insert_with_sqlalchemy(sessions, _task(reference))
    await _submit(open_intake(settings, engine), [_task(submitted)])

    assert await _read_back(sessions, submitted) == await _read_back(sessions, reference)


async def test_outbox_keeps_submission_order(
    settings: Settings, sessions: SessionFactory, engine: AsyncEngine
) -> None:
    tasks = [_task(new_task_id()) for _ in range(50)]
    intake = open_intake(settings, engine)
    try:
        # Five requests in one transaction, as the intake writer batches them.
        requests = [intake.prepare(tasks[start : start + 10]) for start in range(0, 50, 10)]
        await intake.insert(lambda: requests)
    finally:
        await intake.close()
    async with sessions() as session:
        in_order = list(await session.scalars(select(OutboxEntry.task_id).order_by(OutboxEntry.id)))

    assert in_order == [task.task_id for task in tasks]
