"""Helpers for tests: waiting on conditions, migrating databases, reading the audit trail,
and single-task writes in the caller's session (built on the store's reference)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from throttler.constants import DEFAULT_PRIORITY
from throttler.db import SessionFactory
from throttler.job_ids import Dispatch
from throttler.models import Task, TaskEvent, utcnow
from throttler.statuses import EventKind
from throttler.store.attempts import Attempt, Outcome, record_outcomes, start_attempts
from throttler.store.intake import insert_submissions
from throttler.submit import NewTask, new_task_id

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def alembic_config(database_url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url)
    config.attributes["configure_logger"] = False
    return config


def migrate(database_url: str, revision: str = "head") -> None:
    """Run ``alembic upgrade`` (call outside a running event loop)."""
    command.upgrade(alembic_config(database_url), revision)


async def admin_execute(admin_url: str, statement: str) -> None:
    """Run one statement outside a transaction (CREATE or DROP DATABASE on PostgreSQL)."""
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


async def wait_for(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.02,
    message: str = "condition",
) -> T:
    """Await ``probe`` until it returns a truthy value; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")
        await asyncio.sleep(interval_s)


async def event_history(session: AsyncSession, task_id: str) -> list[str]:
    """Return the task's event names, oldest first."""
    rows = await session.execute(
        select(TaskEvent.event).where(TaskEvent.task_id == task_id).order_by(TaskEvent.id)
    )
    return list(rows.scalars())


async def job_ids(session: AsyncSession, task_ids: Iterable[str]) -> dict[str, str]:
    """The ARQ job id of each task's current dispatch (throttler.job_ids), by task id."""
    rows = await session.execute(select(Task.id, Task.queued_at).where(Task.id.in_(task_ids)))
    return {task_id: Dispatch.of(task_id, queued_at=at).job_id for task_id, at in rows}


async def event_times(session: AsyncSession, event: str) -> list[float]:
    """Return the POSIX times of every event of one kind."""
    rows = await session.execute(select(TaskEvent.at).where(TaskEvent.event == event))
    return [at.timestamp() for at in rows.scalars()]


async def submit_greetings(sessions: SessionFactory, count: int) -> list[str]:
    """Submit ``count`` greetings in one transaction, as the API would; return their ids."""
    ids = []
    async with sessions.begin() as session:
        for index in range(count):
            task = await submit_task(
                session,
                name="greeting",
                account="default",
                payload={"name": f"n{index}"},
                now=utcnow(),
            )
            ids.append(task.id)
    return ids


@dataclass(frozen=True, kw_only=True, slots=True)
class Submitted:
    """A task written by ``submit_task``."""

    id: str
    task: NewTask


async def submit_task(
    session: AsyncSession,
    *,
    name: str,
    account: str,
    payload: Mapping[str, Any],
    now: datetime,
    priority: int = DEFAULT_PRIORITY,
    host: str | None = None,
    run_at: datetime | None = None,
    task_id: str | None = None,
    labels: tuple[str, ...] = (),
) -> Submitted:
    """Insert a pending task, its outbox row and its ``submitted`` event in ``session``."""
    task = NewTask(
        name=name,
        account=account,
        payload=dict(payload),
        created_at=now,
        priority=priority,
        host=host,
        run_at=run_at,
        task_id=task_id or new_task_id(),
        labels=labels,
    )
    await insert_submissions(session, [task])
    return Submitted(id=task.task_id, task=task)


async def start_attempt(
    session: AsyncSession, *, task_id: str, worker_id: str, now: datetime
) -> Attempt | None:
    """Mark the queued task ``running`` and count the attempt; None if it is not queued."""
    started = await session.run_sync(
        lambda sync: start_attempts(
            sync, starts=[Dispatch(task_id=task_id)], worker_id=worker_id, now=now
        )
    )
    return started.get(task_id)


async def record_outcome(session: AsyncSession, outcome: Outcome) -> bool:
    """Write one outcome in ``session``; False if the task was already final."""
    return bool(await session.run_sync(record_outcomes, [outcome]))


async def record_success(
    session: AsyncSession,
    *,
    task_id: str,
    result: dict[str, Any],
    attempt: int,
    worker_id: str,
    now: datetime,
) -> bool:
    """Store the result and mark the task ``succeeded``; False if it was already final."""
    return await record_outcome(
        session,
        Outcome(
            task_id=task_id,
            event=EventKind.SUCCEEDED,
            attempt=attempt,
            worker_id=worker_id,
            now=now,
            result=result,
        ),
    )


async def record_failure(
    session: AsyncSession,
    *,
    task_id: str,
    error: str,
    attempt: int,
    worker_id: str,
    now: datetime,
) -> bool:
    """Store the error and mark the task ``failed``; False if it was already final."""
    return await record_outcome(
        session,
        Outcome(
            task_id=task_id,
            event=EventKind.FAILED,
            attempt=attempt,
            worker_id=worker_id,
            now=now,
            error=error,
        ),
    )


async def get_task(session: AsyncSession, *, task_id: str) -> Task | None:
    return (await session.execute(select(Task).where(Task.id == task_id))).scalar_one_or_none()
