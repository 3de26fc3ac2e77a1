"""Task transitions after the relay: started, retrying, succeeded, failed.

Each function runs inside the caller's transaction, changes the task only from a status
that allows the move, and appends the matching event. A task in a terminal status is
never changed again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from throttler.models import Task, TaskEvent
from throttler.statuses import TERMINAL_STATUSES, EventKind, TaskStatus

_NOT_TERMINAL = Task.status.not_in([status.value for status in TERMINAL_STATUSES])


@dataclass(frozen=True, kw_only=True, slots=True)
class Attempt:
    """A started attempt: which one it is, and what the task was asked to do."""

    task_id: str
    name: str
    payload: dict[str, Any]
    attempt: int


async def _append_event(
    session: AsyncSession, *, task_id: str, event: EventKind, now: datetime, detail: dict[str, Any]
) -> None:
    await session.execute(
        insert(TaskEvent).values(task_id=task_id, at=now, event=event, detail=detail)
    )


async def start_attempt(
    session: AsyncSession, *, task_id: str, worker_id: str, now: datetime
) -> Attempt | None:
    """Mark the task ``running`` and count the attempt; None if it is already final.

    A task found ``running`` is a re-run after a worker died mid-attempt: it counts as a
    new start too.
    """
    row = (
        await session.execute(
            update(Task)
            .where(Task.id == task_id, _NOT_TERMINAL)
            .values(status=TaskStatus.RUNNING, attempts=Task.attempts + 1, started_at=now)
            .returning(Task.name, Task.payload, Task.attempts)
        )
    ).one_or_none()
    if row is None:
        return None
    name, payload, attempt = row
    await _append_event(
        session,
        task_id=task_id,
        event=EventKind.STARTED,
        now=now,
        detail={"attempt": attempt, "worker": worker_id},
    )
    return Attempt(task_id=task_id, name=name, payload=payload, attempt=attempt)


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
    changed = (
        await session.execute(
            update(Task)
            .where(Task.id == task_id, _NOT_TERMINAL)
            .values(status=TaskStatus.SUCCEEDED, result=result, error=None, finished_at=now)
            .returning(Task.id)
        )
    ).one_or_none()
    if changed is None:
        return False
    await _append_event(
        session,
        task_id=task_id,
        event=EventKind.SUCCEEDED,
        now=now,
        detail={"attempt": attempt, "worker": worker_id},
    )
    return True


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
    changed = (
        await session.execute(
            update(Task)
            .where(Task.id == task_id, _NOT_TERMINAL)
            .values(status=TaskStatus.FAILED, error=error, finished_at=now)
            .returning(Task.id)
        )
    ).one_or_none()
    if changed is None:
        return False
    await _append_event(
        session,
        task_id=task_id,
        event=EventKind.FAILED,
        now=now,
        detail={"attempt": attempt, "worker": worker_id, "error": error},
    )
    return True


async def record_retry(
    session: AsyncSession,
    *,
    task_id: str,
    error: str,
    attempt: int,
    defer_s: float,
    worker_id: str,
    now: datetime,
) -> bool:
    """Put the task back to ``queued`` for a later attempt; False if it was already final."""
    changed = (
        await session.execute(
            update(Task)
            .where(Task.id == task_id, _NOT_TERMINAL)
            .values(status=TaskStatus.QUEUED, error=error)
            .returning(Task.id)
        )
    ).one_or_none()
    if changed is None:
        return False
    await _append_event(
        session,
        task_id=task_id,
        event=EventKind.RETRYING,
        now=now,
        detail={"attempt": attempt, "worker": worker_id, "error": error, "defer_s": defer_s},
    )
    return True


async def get_task(session: AsyncSession, *, task_id: str) -> Task | None:
    return (await session.execute(select(Task).where(Task.id == task_id))).scalar_one_or_none()
