"""The outbox store's dialect overrides against the reference, row for row.

The same data, the same claim (select, count, lease, release) through the portable
reference (``CoreClaim``: Core, no hints, a second locking read) and through the
database's override (SQLite: rows read in rank order are the claim, ``INDEXED BY``;
PostgreSQL: advisory lock, ``enable_bitmapscan`` off), each in a transaction that is
rolled back afterwards. The claimed rows, their order, the counts and every column of
``tasks``, ``outbox`` and ``task_events`` afterwards must be equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.db import SessionFactory
from throttler.limits import LimitKey, Scope
from throttler.models import OutboxEntry, Task, TaskEvent
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.outbox import ClaimedTask, CoreClaim, Exclusions, open_outbox

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
RELAY = "relay-parity"


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    limit: int
    excluding: Exclusions = field(default_factory=Exclusions)
    due_by: datetime | None = None
    recover_lapsed: bool = True
    sweep_strays: bool = True


CASES = [
    Case(limit=1),
    Case(limit=7),
    Case(limit=40, due_by=NOW + timedelta(seconds=0.5)),
    Case(limit=200),
    Case(limit=15, recover_lapsed=False, sweep_strays=False),
    # Each account's first turns, past its pending tasks under a lease.
    Case(limit=7, recover_lapsed=False, sweep_strays=False),
    Case(limit=21, recover_lapsed=False, sweep_strays=False),
    Case(limit=15, recover_lapsed=True, sweep_strays=False),
    Case(limit=15, excluding=Exclusions.of([LimitKey(scope=Scope.ACCOUNT, value="acct-2")])),
    Case(
        limit=25,
        excluding=Exclusions.of(
            [
                LimitKey(scope=Scope.HOST, value="slow.example"),
                LimitKey(scope=Scope.TASK, value="greeting"),
            ]
        ),
    ),
    Case(limit=15, excluding=Exclusions.of([LimitKey(scope=Scope.CLUSTER)])),
]


async def _seed(sessions: SessionFactory) -> None:
    """A backlog with ties, priorities, future tasks, lapsed and live leases (of queued and
    of still pending tasks), strays."""
    tasks: list[dict[str, Any]] = []
    outbox: list[dict[str, Any]] = []
    for i in range(120):
        status = TaskStatus.PENDING
        claimed_until = None
        if i % 17 == 3:
            status, claimed_until = TaskStatus.QUEUED, NOW - timedelta(seconds=i)  # lapsed
        elif i % 17 == 5:
            status, claimed_until = TaskStatus.RUNNING, NOW - timedelta(seconds=1)  # lapsed
        elif i % 17 == 7:
            status = TaskStatus.SUCCEEDED  # a stray row
        elif i % 17 == 9:
            status, claimed_until = TaskStatus.QUEUED, NOW + timedelta(seconds=20)  # live
        elif i % 17 == 11:
            claimed_until = NOW + timedelta(seconds=20)  # live, its task still pending
        elif i % 17 == 13:
            claimed_until = NOW - timedelta(seconds=2)  # lapsed, its task still pending
        download = i % 4 == 0
        task_id = f"task-{i:04d}"
        tasks.append(
            {
                "id": task_id,
                "name": "download" if download else "greeting",
                "account": f"acct-{i % 7}",
                "payload": {},
                "host": ("slow.example" if i % 8 == 0 else "fast.example") if download else None,
                "status": status,
                "priority": (3, 5, 5, 7)[i % 4],
                "attempts": 0,
                # Ties in age: 21 tasks per second, three of each account.
                "created_at": NOW - timedelta(seconds=60 - i // 21),
                "run_at": NOW + timedelta(seconds=(0.2, 3.0)[i % 2]) if i % 11 == 0 else None,
            }
        )
        outbox.append(
            {
                "task_id": task_id,
                "created_at": NOW - timedelta(seconds=60),
                "claimed_by": None if claimed_until is None else "relay-dead",
                "claimed_until": claimed_until,
            }
        )
    # Outbox order differs from age order, so that ties are broken by the outbox id.
    outbox.reverse()
    async with sessions.begin() as session:
        await session.execute(insert(Task), tasks)
        await session.execute(insert(OutboxEntry), outbox)


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    claims: Sequence[ClaimedTask]
    pending_accounts: Sequence[str]
    inflight: dict[LimitKey, int]
    leased: int
    rows: dict[str, list[tuple[Any, ...]]]


async def _claim(claim: CoreClaim, case: Case) -> Outcome:
    await claim.serialize()
    pending_accounts = await claim.pending_accounts()
    inflight = await claim.count_inflight_by_key(scopes=list(Scope))
    leased = await claim.count_leased(now=NOW)
    claims = await claim.select_claimable(
        limit=case.limit,
        now=NOW,
        due_by=case.due_by,
        excluding=case.excluding,
        recover_lapsed=case.recover_lapsed,
        sweep_strays=case.sweep_strays,
    )
    going = [c for c in claims if c.needs_enqueue]
    # Several distinct moments, as under a rate limit.
    moments = [NOW + timedelta(milliseconds=10 * (i % 3)) for i in range(len(going))]
    await claim.lease(claims=going, queued_at=moments, relay_id=RELAY, lease_s=30)
    finished = [c for c in claims if not c.needs_enqueue]
    await claim.lease(claims=finished, queued_at=[NOW] * len(finished), relay_id=RELAY, lease_s=30)
    await claim.release(relay_id=RELAY, outbox_ids=[c.outbox_id for c in finished])
    await claim.mark_queued(task_ids=["task-0001", "task-0002"], relay_id=RELAY, now=NOW)
    return Outcome(
        claims=claims,
        pending_accounts=pending_accounts,
        inflight=inflight,
        leased=leased,
        rows=await _rows(claim),
    )


async def _rows(claim: CoreClaim) -> dict[str, list[tuple[Any, ...]]]:
    """Every column of the three tables; event ids relative to the first (sequences move on)."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for model in (Task, OutboxEntry, TaskEvent):
        table: Any = model.__table__
        found = await claim.session.execute(select(table).order_by(*table.primary_key.columns))
        rows[model.__tablename__] = [tuple(row) for row in found]
    events = rows["task_events"]
    first_id = events[0][0] if events else 0
    rows["task_events"] = [(row[0] - first_id, *row[1:]) for row in events]
    return rows


async def _run(sessions: SessionFactory, claim_type: type[CoreClaim], case: Case) -> Outcome:
    async with sessions() as session:
        try:
            return await _claim(claim_type(session), case)
        finally:
            await session.rollback()


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case}"[:60])
async def test_the_override_claims_what_the_reference_claims(
    settings: Settings, engine: AsyncEngine, sessions: SessionFactory, case: Case
) -> None:
    override = open_outbox(settings=settings, engine=engine).claim_type
    assert override is not CoreClaim, "every supported database has fast paths"
    await _seed(sessions)
    reference = await _run(sessions, CoreClaim, case)
    fast = await _run(sessions, override, case)
    assert fast.claims == reference.claims
    assert fast.pending_accounts == reference.pending_accounts
    assert (fast.inflight, fast.leased) == (reference.inflight, reference.leased)
    for table, rows in reference.rows.items():
        assert fast.rows[table] == rows, table
    # The case took something, and a rolled-back run leaves nothing behind.
    assert reference.claims or case.limit == 0
    again = await _run(sessions, CoreClaim, case)
    assert again.claims == reference.claims


async def test_the_claim_order_takes_accounts_in_turn_on_both(
    settings: Settings, engine: AsyncEngine, sessions: SessionFactory
) -> None:
    await _seed(sessions)
    override = open_outbox(settings=settings, engine=engine).claim_type
    case = Case(limit=200, recover_lapsed=False, sweep_strays=False)
    for claim_type in (CoreClaim, override):
        claims = (await _run(sessions, claim_type, case)).claims
        accounts = [claim.account for claim in claims]
        # Turn one for each of the seven accounts first, then turn two.
        assert sorted(accounts[:7]) == [f"acct-{i}" for i in range(7)]
        assert all(claim.status is TaskStatus.PENDING for claim in claims)
        assert len({c.task_id for c in claims}) == len(claims)
