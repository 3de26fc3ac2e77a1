"""The outbox repository against a real database: submit, claim, lease recovery."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from tests.support import event_history, record_success, start_attempt, submit_greetings
from throttler.claim import select_claimable
from throttler.db import SessionFactory
from throttler.models import OutboxEntry, Task, utcnow
from throttler.outbox import lease, release_claimed
from throttler.statuses import TaskStatus


async def test_claim_marks_queued_once_and_release_empties_outbox(
    sessions: SessionFactory,
) -> None:
    ids = await submit_greetings(sessions, 3)
    now = utcnow()
    async with sessions.begin() as session:
        claims = await select_claimable(session, limit=2, now=now)
        await lease(session, claims=claims, relay_id="r1", now=now, lease_s=30)
    assert [claim.task_id for claim in claims] == ids[:2]

    async with sessions.begin() as session:
        # Leased rows are not offered again while the lease holds.
        again = await select_claimable(session, limit=10, now=utcnow())
        assert [claim.task_id for claim in again] == ids[2:]
        await release_claimed(session, relay_id="r1", outbox_ids=[c.outbox_id for c in claims])

    async with sessions.begin() as session:
        rows = (await session.execute(select(Task.id, Task.status))).all()
        statuses = {row.id: row.status for row in rows}
        assert statuses == {ids[0]: "queued", ids[1]: "queued", ids[2]: "pending"}
        assert await event_history(session, ids[0]) == ["submitted", "queued"]
        outbox = await session.scalar(select(func.count()).select_from(OutboxEntry))
        assert outbox == 1


async def test_expired_lease_is_reclaimed_without_second_queued_event(
    sessions: SessionFactory,
) -> None:
    (task_id,) = await submit_greetings(sessions, 1)
    now = utcnow()
    async with sessions.begin() as session:
        claims = await select_claimable(session, limit=1, now=now)
        await lease(session, claims=claims, relay_id="dead", now=now, lease_s=1)

    later = now + timedelta(seconds=2)
    async with sessions.begin() as session:
        (claim,) = await select_claimable(session, limit=1, now=later)
        assert claim.status is TaskStatus.QUEUED
        assert claim.needs_enqueue
        await lease(session, claims=[claim], relay_id="r2", now=later, lease_s=30)
        assert await event_history(session, task_id) == ["submitted", "queued"]


async def test_reclaimed_row_of_finished_task_is_not_enqueued_again(
    sessions: SessionFactory,
) -> None:
    (task_id,) = await submit_greetings(sessions, 1)
    now = utcnow()
    async with sessions.begin() as session:
        claims = await select_claimable(session, limit=1, now=now)
        await lease(session, claims=claims, relay_id="dead", now=now, lease_s=1)
    async with sessions.begin() as session:
        attempt = await start_attempt(session, task_id=task_id, worker_id="w", now=utcnow())
        assert attempt is not None
        assert attempt.attempt == 1
        await record_success(
            session, task_id=task_id, result={"ok": 1}, attempt=1, worker_id="w", now=utcnow()
        )
    async with sessions.begin() as session:
        (claim,) = await select_claimable(session, limit=1, now=now + timedelta(seconds=5))
        assert not claim.needs_enqueue
        assert await start_attempt(session, task_id=task_id, worker_id="w", now=utcnow()) is None
