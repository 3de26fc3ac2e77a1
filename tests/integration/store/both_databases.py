"""The same rows in a SQLite file and a PostgreSQL database, and every row read back.

For the stores without a dialect override (recovery, reads): the reference must leave
identical rows, and answer identically, on both databases.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.db import create_engine
from throttler.models import Base, OutboxEntry, Task, TaskEvent
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus

T = TypeVar("T")
# A fixed "now": every time in the rows and in the calls derives from it.
NOW = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
Rows = dict[str, list[dict[str, Any]]]


@asynccontextmanager
async def sqlite_and_postgres(
    *, tmp_path: Path, sqlite_template: Path, postgres_url: str
) -> AsyncIterator[dict[str, tuple[Settings, AsyncEngine]]]:
    """Open an empty, migrated database of each kind: name to (settings, engine)."""
    path = tmp_path / "parity.db"
    shutil.copyfile(sqlite_template, path)
    opened: dict[str, tuple[Settings, AsyncEngine]] = {}
    for name, url in (("sqlite", f"sqlite+aiosqlite:///{path}"), ("postgres", postgres_url)):
        settings = Settings(database_url=url)
        opened[name] = (settings, create_engine(settings))
    try:
        _, postgres = opened["postgres"]
        tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
        async with postgres.begin() as connection:
            await connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        yield opened
    finally:
        for _, engine in opened.values():
            await engine.dispose()


async def on_both(
    databases: dict[str, tuple[Settings, AsyncEngine]],
    scenario: Callable[[Settings, AsyncEngine], Awaitable[T]],
) -> dict[str, T]:
    """Run ``scenario`` on each database; return its result per database name."""
    return {
        name: await scenario(settings, engine) for name, (settings, engine) in databases.items()
    }


def task_row(
    task_id: str,
    *,
    status: TaskStatus,
    ago: timedelta,
    attempts: int = 0,
    name: str = "greeting",
    account: str = "default",
    host: str | None = None,
    finished: bool = False,
) -> dict[str, Any]:
    """A tasks row as the pipeline leaves it: queued, started or finished ``ago``."""
    at = NOW - ago
    queued = status in (TaskStatus.QUEUED, TaskStatus.RUNNING) or finished
    return {
        "id": task_id,
        "name": name,
        "account": account,
        "payload": {"name": task_id},
        "host": host,
        "status": status.value,
        "priority": 5,
        "attempts": attempts,
        "result": {"message": "done"} if status is TaskStatus.SUCCEEDED else None,
        "error": "broke" if status is TaskStatus.FAILED else None,
        "created_at": at - timedelta(seconds=2),
        "run_at": None,
        "queued_at": at - timedelta(seconds=1) if queued else None,
        "started_at": at if status is TaskStatus.RUNNING or finished else None,
        "finished_at": at if finished else None,
    }


async def insert_rows(
    engine: AsyncEngine,
    *,
    tasks: Sequence[dict[str, Any]],
    outbox_task_ids: Sequence[str] = (),
    queued_events_ago: Sequence[tuple[str, timedelta]] = (),
) -> None:
    """Insert the tasks (each with a ``submitted`` event), outbox rows and ``queued`` events."""
    async with engine.begin() as connection:
        await connection.execute(insert(Task), list(tasks))
        events = [
            {
                "task_id": task["id"],
                "at": task["created_at"],
                "event": EventKind.SUBMITTED.value,
                "detail": {},
            }
            for task in tasks
        ]
        events += [
            {"task_id": task_id, "at": NOW - ago, "event": EventKind.QUEUED.value, "detail": {}}
            for task_id, ago in queued_events_ago
        ]
        await connection.execute(insert(TaskEvent), events)
        if outbox_task_ids:
            await connection.execute(
                insert(OutboxEntry),
                [{"task_id": task_id, "created_at": NOW} for task_id in outbox_task_ids],
            )


async def all_rows(engine: AsyncEngine) -> Rows:
    """Every column of every row of the three tables, in primary-key order."""
    rows: Rows = {}
    async with engine.connect() as connection:
        for model in (Task, OutboxEntry, TaskEvent):
            table = Base.metadata.tables[model.__tablename__]
            result = await connection.execute(select(table).order_by(*table.primary_key))
            rows[table.name] = [dict(row._mapping) for row in result]
    return rows
