"""The claim policy against a real database: turns across many accounts, strays, leases."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import event, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.test_relay_flow import NewTask, bulk_submit
from tests.support import submit_greetings
from throttler.db import SessionFactory
from throttler.limits import LimitKey, Scope
from throttler.models import Task, utcnow
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.outbox import CoreOutbox, Exclusions, open_outbox


@pytest.fixture
def outbox(settings: Settings, engine: AsyncEngine) -> CoreOutbox:
    return open_outbox(settings=settings, engine=engine)


async def test_accounts_take_turns_across_many_statements(
    sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    # More accounts than one UNION ALL statement reads: every account still gets its turn.
    accounts = [f"acct-{i:03d}" for i in range(450)]
    await bulk_submit(sessions, [NewTask(account=a) for a in accounts for _ in range(3)])
    async with outbox.claiming() as tx:
        assert await tx.pending_accounts() == accounts
        claims = await tx.select_claimable(limit=len(accounts) + 10, now=utcnow())
    taken = Counter(claim.account for claim in claims)
    # Turn one for everybody first, then turn two in the same order.
    assert [claim.account for claim in claims[: len(accounts)]] == accounts
    assert sorted(taken.values()) == [1] * (len(accounts) - 10) + [2] * 10


async def test_ties_in_age_go_in_submission_order(
    sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    # One bulk submission: every task has the same created_at.
    ids = await bulk_submit(sessions, [NewTask(priority=p) for p in (5, 7, 5, 7, 5)])
    async with outbox.claiming() as tx:
        claims = await tx.select_claimable(limit=5, now=utcnow())
    assert [c.task_id for c in claims] == [ids[1], ids[3], ids[0], ids[2], ids[4]]


async def test_an_excluded_account_holds_back_nothing(
    sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    busy = await bulk_submit(sessions, [NewTask(account="busy") for _ in range(50)])
    other = await bulk_submit(sessions, [NewTask(account="other") for _ in range(3)])
    excluded = Exclusions.of([LimitKey(scope=Scope.ACCOUNT, value="busy")])
    async with outbox.claiming() as tx:
        claims = await tx.select_claimable(limit=10, now=utcnow(), excluding=excluded)
    assert [c.task_id for c in claims] == other
    assert not set(busy) & {c.task_id for c in claims}


async def test_a_stray_row_is_found_by_the_sweep_only(
    sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    """An unleased row whose task moved on (its old ARQ job ran after a requeue)."""
    stray, fresh = await submit_greetings(sessions, 2)
    async with outbox.claiming() as tx:
        await tx.session.execute(
            update(Task).where(Task.id == stray).values(status=TaskStatus.SUCCEEDED)
        )
    async with outbox.claiming() as tx:
        quick = await tx.select_claimable(limit=5, now=utcnow(), sweep_strays=False)
        assert [c.task_id for c in quick] == [fresh]
    async with outbox.claiming() as tx:
        swept = await tx.select_claimable(limit=5, now=utcnow(), sweep_strays=True)
    assert [c.task_id for c in swept] == [stray, fresh]
    assert not swept[0].needs_enqueue


async def test_lapsed_leases_come_first(sessions: SessionFactory, outbox: CoreOutbox) -> None:
    first, second, third = await submit_greetings(sessions, 3)
    now = utcnow()
    async with outbox.claiming() as tx:
        (claim,) = [c for c in await tx.select_claimable(limit=3, now=now) if c.task_id == third]
        await tx.lease(claims=[claim], queued_at=[now], relay_id="dead", lease_s=1)
    later = now + timedelta(seconds=5)
    async with outbox.claiming() as tx:
        claims = await tx.select_claimable(limit=3, now=later, sweep_strays=False)
    assert [c.task_id for c in claims] == [third, first, second]
    assert claims[0].status is TaskStatus.QUEUED


async def test_a_busy_account_fills_the_claim_when_the_others_run_dry(
    sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    # Nine accounts with one task each and one with thirty: a claim of 20 reads the busy
    # account deeper than limit/accounts (2) and still takes 20, every small one first.
    small = [f"small-{i}" for i in range(9)]
    await bulk_submit(sessions, [NewTask(account=a) for a in small])
    await bulk_submit(sessions, [NewTask(account="busy") for _ in range(30)])
    async with outbox.claiming() as tx:
        claims = await tx.select_claimable(limit=20, now=utcnow())
    taken = Counter(claim.account for claim in claims)
    assert taken == Counter({**dict.fromkeys(small, 1), "busy": 11})


async def test_many_accounts_cost_a_claim_its_batch_not_the_backlog(
    sessions: SessionFactory, outbox: CoreOutbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 300 accounts with 20 tasks each: a claim of 100 takes each of the 100 oldest
    # accounts' first task, and reads one row of each account (not 100 of each).
    accounts = [f"acct-{i:03d}" for i in range(300)]
    for account in accounts:
        await bulk_submit(sessions, [NewTask(account=account) for _ in range(20)])
    read: list[int] = []
    async with outbox.claiming() as tx:
        ranked = tx._ranked

        async def counted(*args: object, **kwargs: object) -> list[object]:
            rows = await ranked(*args, **kwargs)  # type: ignore[arg-type]
            read.append(len(rows))
            return rows  # type: ignore[return-value]

        monkeypatch.setattr(tx, "_ranked", counted)
        claims = await tx.select_claimable(limit=100, now=utcnow())
    assert [claim.account for claim in claims] == accounts[:100]
    assert sum(read) == len(accounts)


async def _ranked_reads(engine: AsyncEngine, outbox: CoreOutbox, *, limit: int) -> list[str]:
    """The statements a claim sends to read accounts' tasks in rank order."""
    seen: list[str] = []

    def capture(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if "ORDER BY tasks.priority DESC, tasks.created_at" in statement:
            seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with outbox.claiming() as tx:
            assert len(await tx.select_claimable(limit=limit, now=utcnow())) == limit
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    return seen


async def test_a_claim_reads_any_number_of_accounts_in_one_fixed_statement(
    engine: AsyncEngine, sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    # The accounts travel as one array: the statement's text, and what it costs to build
    # and compile, do not grow with them. One part per account (the reference's UNION
    # ALL) cost seconds of Python at 10,000 accounts, past PostgreSQL's idle limit.
    await bulk_submit(sessions, [NewTask(account=f"few-{i}") for i in range(3) for _ in range(9)])
    few = await _ranked_reads(engine, outbox, limit=20)
    await bulk_submit(sessions, [NewTask(account=f"many-{i:03d}") for i in range(600)])
    many = await _ranked_reads(engine, outbox, limit=100)
    assert len(many) == 1
    assert many == few


async def test_accounts_of_any_spelling_travel_in_the_array(
    sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    # The accounts reach the ranked read as one array (JSON on SQLite, text[] on
    # PostgreSQL): quotes, backslashes, commas, brackets, accents and characters beyond
    # the BMP must each come back as the same account.
    accounts = sorted(['a"b', "c\\d", "e,f", "[g]", "acct-é", "账户", "🙂x", "tab\there", "{}"])
    await bulk_submit(sessions, [NewTask(account=a) for a in accounts for _ in range(2)])
    async with outbox.claiming() as tx:
        claims = await tx.select_claimable(limit=len(accounts), now=utcnow())
    assert sorted(claim.account for claim in claims) == accounts
