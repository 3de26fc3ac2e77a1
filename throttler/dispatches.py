"""What the database knows of past dispatches, for a limiter that lost its buckets."""

from __future__ import annotations

from functools import partial

from sqlalchemy import func, select

from throttler.db import SessionFactory
from throttler.models import Task
from throttler.throttle import LastDispatch


async def last_dispatch_s(sessions: SessionFactory) -> float | None:
    """The latest ``queued_at`` of any task as POSIX seconds (None: nothing dispatched yet).

    ``queued_at`` is the moment a task may start, which the relay sets up to its reserve
    horizon ahead, so this covers every token the buckets lent. One scan of the tasks
    table, asked only when Redis has lost the drain floor (a restart), never per claim.
    """
    async with sessions() as session:
        latest = await session.scalar(select(func.max(Task.queued_at)))
    return None if latest is None else latest.timestamp()


def last_dispatch_from(sessions: SessionFactory) -> LastDispatch:
    """``last_dispatch_s`` bound to a session factory, as the limiter asks for it."""
    return partial(last_dispatch_s, sessions)
