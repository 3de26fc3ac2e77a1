"""Retention: old finished tasks and their events go, in batches; nothing else does."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support import submit_task, wait_for
from throttler.db import SessionFactory
from throttler.models import OutboxEntry, Task, TaskEvent, TaskLabel, utcnow
from throttler.retention import Pruner, prune_once
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.recovery import RecoveryStore, open_recovery


@pytest.fixture
def recovery(settings: Settings, engine: AsyncEngine) -> RecoveryStore:
    return open_recovery(settings, engine)


async def _make_task(
    sessions: SessionFactory,
    *,
    status: TaskStatus,
    finished_days_ago: float | None,
    labels: tuple[str, ...] = (),
) -> str:
    now = utcnow()
    async with sessions.begin() as session:
        task = await submit_task(
            session,
            name="greeting",
            account="default",
            payload={"name": "Ada"},
            now=now - timedelta(days=30),
            labels=labels,
        )
        finished_at = None if finished_days_ago is None else now - timedelta(days=finished_days_ago)
        await session.execute(
            update(Task).where(Task.id == task.id).values(status=status, finished_at=finished_at)
        )
    return task.id


async def _remaining(sessions: SessionFactory) -> tuple[set[str], int, int]:
    async with sessions() as session:
        ids = set((await session.execute(select(Task.id))).scalars())
        events = int(await session.scalar(select(func.count()).select_from(TaskEvent)) or 0)
        outbox = int(await session.scalar(select(func.count()).select_from(OutboxEntry)) or 0)
    return ids, events, outbox


async def test_prunes_old_terminal_tasks_with_their_events(
    sessions: SessionFactory, recovery: RecoveryStore
) -> None:
    old = [
        await _make_task(sessions, status=status, finished_days_ago=10)
        for status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED) * 2
    ]
    recent = await _make_task(sessions, status=TaskStatus.SUCCEEDED, finished_days_ago=1)
    # Not terminal, however old: never pruned.
    pending = await _make_task(sessions, status=TaskStatus.PENDING, finished_days_ago=None)
    running = await _make_task(sessions, status=TaskStatus.RUNNING, finished_days_ago=None)

    pruned = await prune_once(store=recovery, retention_days=7, now=utcnow(), batch_size=4)

    assert pruned == len(old)
    ids, events, outbox = await _remaining(sessions)
    assert ids == {recent, pending, running}
    assert events == 3  # one `submitted` each
    assert outbox == 3
    assert await prune_once(store=recovery, retention_days=7, now=utcnow()) == 0


async def test_a_pruned_task_takes_its_labels(
    sessions: SessionFactory, recovery: RecoveryStore
) -> None:
    labels = ("connector:salesforce", "tenant:acme")
    await _make_task(sessions, status=TaskStatus.FAILED, finished_days_ago=10, labels=labels)
    kept = await _make_task(sessions, status=TaskStatus.FAILED, finished_days_ago=1, labels=labels)

    assert await prune_once(store=recovery, retention_days=7, now=utcnow()) == 1

    async with sessions() as session:
        rows = (await session.execute(select(TaskLabel.task_id, TaskLabel.label))).all()
    assert sorted(rows) == [(kept, label) for label in labels]


async def test_max_batches_bounds_one_call(
    sessions: SessionFactory, recovery: RecoveryStore
) -> None:
    for _ in range(5):
        await _make_task(sessions, status=TaskStatus.SUCCEEDED, finished_days_ago=10)

    first = await prune_once(
        store=recovery, retention_days=1, now=utcnow(), batch_size=2, max_batches=1
    )
    rest = await prune_once(store=recovery, retention_days=1, now=utcnow(), batch_size=2)

    assert (first, rest) == (2, 3)


async def test_zero_days_keeps_everything(
    sessions: SessionFactory, recovery: RecoveryStore
) -> None:
    task_id = await _make_task(sessions, status=TaskStatus.SUCCEEDED, finished_days_ago=3650)

    assert await prune_once(store=recovery, retention_days=0, now=utcnow()) == 0
    assert (await _remaining(sessions))[0] == {task_id}


async def test_concurrent_pruners_delete_each_task_once(
    sessions: SessionFactory, recovery: RecoveryStore
) -> None:
    for _ in range(30):
        await _make_task(sessions, status=TaskStatus.FAILED, finished_days_ago=10)

    counts = await asyncio.gather(
        *(
            prune_once(store=recovery, retention_days=1, now=utcnow(), batch_size=4)
            for _ in range(3)
        )
    )

    assert sum(counts) == 30
    assert await _remaining(sessions) == (set(), 0, 0)


async def test_pruner_loop(
    settings: Settings, sessions: SessionFactory, recovery: RecoveryStore
) -> None:
    task_id = await _make_task(sessions, status=TaskStatus.SUCCEEDED, finished_days_ago=10)
    pruner = Pruner(
        settings=settings.model_copy(update={"retention_days": 2}),
        store=recovery,
        interval_s=0.05,
    )
    running = asyncio.create_task(pruner.run())
    try:

        async def gone() -> bool:
            return task_id not in (await _remaining(sessions))[0]

        await wait_for(gone, timeout_s=5, message="the pruner to delete the task")
    finally:
        pruner.stop()
        await asyncio.wait_for(running, timeout=5)
