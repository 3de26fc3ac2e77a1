"""The outbox repository against a real database: submit, claim, lease recovery."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support import event_history, record_success, start_attempt, submit_greetings
from throttler.db import SessionFactory
from throttler.models import OutboxEntry, Task, TaskEvent, utcnow
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.outbox import CoreOutbox, open_outbox


@pytest.fixture
def outbox(settings: Settings, engine: AsyncEngine) -> CoreOutbox:
    return open_outbox(settings=settings, engine=engine)


async def test_claim_marks_queued_once_and_release_empties_outbox(
    sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    ids = await submit_greetings(sessions, 3)
    now = utcnow()
    async with outbox.claiming() as tx:
        claims = await tx.select_claimable(limit=2, now=now)
        await tx.lease(claims=claims, queued_at=[now] * len(claims), relay_id="r1", lease_s=30)
    assert [claim.task_id for claim in claims] == ids[:2]

    async with outbox.claiming() as tx:
        # Leased rows are not offered again while the lease holds.
        again = await tx.select_claimable(limit=10, now=utcnow())
        assert [claim.task_id for claim in again] == ids[2:]
        await tx.release(relay_id="r1", outbox_ids=[c.outbox_id for c in claims])

    async with outbox.claiming() as tx:
        rows = (await tx.session.execute(select(Task.id, Task.status))).all()
        statuses = {row.id: row.status for row in rows}
        assert statuses == {ids[0]: "queued", ids[1]: "queued", ids[2]: "pending"}
        assert await event_history(tx.session, ids[0]) == ["submitted", "queued"]
        rows_left = await tx.session.scalar(select(func.count()).select_from(OutboxEntry))
        assert rows_left == 1


async def test_expired_lease_is_reclaimed_without_second_queued_event(
    sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    (task_id,) = await submit_greetings(sessions, 1)
    now = utcnow()
    async with outbox.claiming() as tx:
        claims = await tx.select_claimable(limit=1, now=now)
        await tx.lease(claims=claims, queued_at=[now] * len(claims), relay_id="dead", lease_s=1)

    later = now + timedelta(seconds=2)
    async with outbox.claiming() as tx:
        (claim,) = await tx.select_claimable(limit=1, now=later)
        assert claim.status is TaskStatus.QUEUED
        assert claim.needs_enqueue
        await tx.lease(claims=[claim], queued_at=[later], relay_id="r2", lease_s=30)
        assert await event_history(tx.session, task_id) == ["submitted", "queued"]


async def test_reclaimed_row_of_finished_task_is_not_enqueued_again(
    sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    (task_id,) = await submit_greetings(sessions, 1)
    now = utcnow()
    async with outbox.claiming() as tx:
        claims = await tx.select_claimable(limit=1, now=now)
        await tx.lease(claims=claims, queued_at=[now] * len(claims), relay_id="dead", lease_s=1)
    async with outbox.claiming() as tx:
        attempt = await start_attempt(tx.session, task_id=task_id, worker_id="w", now=utcnow())
        assert attempt is not None
        assert attempt.attempt == 1
        await record_success(
            tx.session, task_id=task_id, result={"ok": 1}, attempt=1, worker_id="w", now=utcnow()
        )
    async with outbox.claiming() as tx:
        (claim,) = await tx.select_claimable(limit=1, now=now + timedelta(seconds=5))
        assert not claim.needs_enqueue
        assert await start_attempt(tx.session, task_id=task_id, worker_id="w", now=utcnow()) is None


async def test_retime_moves_only_rows_still_leased_to_the_relay(
    sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    ids = await submit_greetings(sessions, 2)
    now = utcnow()
    async with outbox.claiming() as tx:
        claims = await tx.select_claimable(limit=2, now=now)
        await tx.lease(claims=claims, queued_at=[now, now], relay_id="slow", lease_s=1)
    # The second row's lease lapsed and another relay took it meanwhile.
    async with outbox.claiming() as tx:
        await tx.lease(claims=claims[1:], queued_at=[now], relay_id="other", lease_s=30)

    later = now + timedelta(seconds=3)
    async with outbox.claiming() as tx:
        kept = await tx.retime(claims=claims, queued_at=[later, later], relay_id="slow", lease_s=5)
    assert kept == {claims[0].outbox_id}

    async with sessions() as session:
        rows = await session.execute(select(Task.id, Task.queued_at))
        queued_at = {task_id: at for task_id, at in rows}
        assert queued_at == {ids[0]: later, ids[1]: now}
        (event_at,) = await session.scalars(
            select(TaskEvent.at).where(TaskEvent.task_id == ids[0], TaskEvent.event == "queued")
        )
        assert event_at == later
        until = await session.scalar(
            select(OutboxEntry.claimed_until).where(OutboxEntry.id == claims[0].outbox_id)
        )
        # The lease covers the new moment.
        assert until == later + timedelta(seconds=5)
        assert await event_history(session, ids[0]) == ["submitted", "queued"]
