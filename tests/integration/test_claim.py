"""The claim policy against a real database: turns across many accounts, strays, leases."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from sqlalchemy import update

from tests.integration.test_relay_flow import NewTask, bulk_submit
from tests.support import submit_greetings
from throttler.claim import Exclusions, pending_accounts, select_claimable
from throttler.db import SessionFactory
from throttler.limits import LimitKey, Scope
from throttler.models import Task, utcnow
from throttler.outbox import lease
from throttler.statuses import TaskStatus


async def test_accounts_take_turns_across_many_statements(sessions: SessionFactory) -> None:
    # More accounts than one UNION ALL statement reads: every account still gets its turn.
    accounts = [f"acct-{i:03d}" for i in range(450)]
    await bulk_submit(sessions, [NewTask(account=a) for a in accounts for _ in range(3)])
    async with sessions.begin() as session:
        assert await pending_accounts(session) == accounts
        claims = await select_claimable(session, limit=len(accounts) + 10, now=utcnow())
    taken = Counter(claim.account for claim in claims)
    # Turn one for everybody first, then turn two in the same order.
    assert [claim.account for claim in claims[: len(accounts)]] == accounts
    assert sorted(taken.values()) == [1] * (len(accounts) - 10) + [2] * 10


async def test_ties_in_age_go_in_submission_order(sessions: SessionFactory) -> None:
    # One bulk submission: every task has the same created_at.
    ids = await bulk_submit(sessions, [NewTask(priority=p) for p in (5, 7, 5, 7, 5)])
    async with sessions.begin() as session:
        claims = await select_claimable(session, limit=5, now=utcnow())
    assert [c.task_id for c in claims] == [ids[1], ids[3], ids[0], ids[2], ids[4]]


async def test_an_excluded_account_holds_back_nothing(sessions: SessionFactory) -> None:
    busy = await bulk_submit(sessions, [NewTask(account="busy") for _ in range(50)])
    other = await bulk_submit(sessions, [NewTask(account="other") for _ in range(3)])
    excluded = Exclusions.of([LimitKey(scope=Scope.ACCOUNT, value="busy")])
    async with sessions.begin() as session:
        claims = await select_claimable(session, limit=10, now=utcnow(), excluding=excluded)
    assert [c.task_id for c in claims] == other
    assert not set(busy) & {c.task_id for c in claims}


async def test_a_stray_row_is_found_by_the_sweep_only(sessions: SessionFactory) -> None:
    """An unleased row whose task moved on (its old ARQ job ran after a requeue)."""
    stray, fresh = await submit_greetings(sessions, 2)
    async with sessions.begin() as session:
        await session.execute(
            update(Task).where(Task.id == stray).values(status=TaskStatus.SUCCEEDED)
        )
    async with sessions.begin() as session:
        quick = await select_claimable(session, limit=5, now=utcnow(), sweep_strays=False)
        assert [c.task_id for c in quick] == [fresh]
    async with sessions.begin() as session:
        swept = await select_claimable(session, limit=5, now=utcnow(), sweep_strays=True)
    assert [c.task_id for c in swept] == [stray, fresh]
    assert not swept[0].needs_enqueue


async def test_lapsed_leases_come_first(sessions: SessionFactory) -> None:
    first, second, third = await submit_greetings(sessions, 3)
    now = utcnow()
    async with sessions.begin() as session:
        (claim,) = [
            c for c in await select_claimable(session, limit=3, now=now) if c.task_id == third
        ]
        await lease(session, claims=[claim], relay_id="dead", now=now, lease_s=1)
    later = now + timedelta(seconds=5)
    async with sessions.begin() as session:
        claims = await select_claimable(session, limit=3, now=later, sweep_strays=False)
    assert [c.task_id for c in claims] == [third, first, second]
    assert claims[0].status is TaskStatus.QUEUED
