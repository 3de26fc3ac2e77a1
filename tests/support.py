"""Helpers for tests: waiting on conditions, migrating databases, reading the audit trail."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from throttler.db import SessionFactory
from throttler.models import TaskEvent, utcnow
from throttler.submit import submit_task

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
