"""Paused ``*`` scopes in the claim, on both databases: ``host:*`` leaves out every
download and nothing else; ``task:*`` and ``account:*`` leave out every task;
``key:<prefix>:*`` every task with a label of that prefix, and nothing else."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.test_relay_flow import NewTask, bulk_submit
from tests.support import submit_task
from throttler.db import SessionFactory
from throttler.limits import EACH, LimitKey, Scope
from throttler.models import utcnow
from throttler.settings import Settings
from throttler.store.outbox import CoreOutbox, Exclusions, open_outbox


@pytest.fixture
def outbox(settings: Settings, engine: AsyncEngine) -> CoreOutbox:
    return open_outbox(settings=settings, engine=engine)


async def test_a_paused_host_each_leaves_out_every_download(
    sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    downloads = await bulk_submit(
        sessions, [NewTask(name="download", host=f"h{n}.example") for n in range(5)]
    )
    greetings = await bulk_submit(sessions, [NewTask() for _ in range(3)])
    excluded = Exclusions.of([LimitKey(scope=Scope.HOST, value=EACH)])
    async with outbox.claiming() as tx:
        claims = await tx.select_claimable(limit=20, now=utcnow(), excluding=excluded)
    assert [c.task_id for c in claims] == greetings
    assert not set(downloads) & {c.task_id for c in claims}


@pytest.mark.parametrize("scope", [Scope.TASK, Scope.ACCOUNT])
async def test_a_paused_task_or_account_each_leaves_out_everything(
    sessions: SessionFactory, outbox: CoreOutbox, scope: Scope
) -> None:
    await bulk_submit(sessions, [NewTask(account=f"a{n}") for n in range(4)])
    excluded = Exclusions.of([LimitKey(scope=scope, value=EACH)])
    async with outbox.claiming() as tx:
        assert await tx.select_claimable(limit=20, now=utcnow(), excluding=excluded) == []


async def _labelled(sessions: SessionFactory, *label_sets: tuple[str, ...]) -> list[str]:
    ids = []
    async with sessions.begin() as session:
        for labels in label_sets:
            task = await submit_task(
                session, name="greeting", account="a", payload={}, now=utcnow(), labels=labels
            )
            ids.append(task.id)
    return ids


async def test_a_paused_label_prefix_leaves_out_that_prefixs_tasks_only(
    sessions: SessionFactory, outbox: CoreOutbox
) -> None:
    connectors = await _labelled(sessions, ("connector:sf",), ("connector:hub", "tenant:a"))
    others = await _labelled(sessions, ("tenant:a",), ("connectors:x",), ())
    paused = [LimitKey(scope=Scope.KEY, value=f"connector:{EACH}")]
    async with outbox.claiming() as tx:
        claims = await tx.select_claimable(limit=20, now=utcnow(), excluding=Exclusions.of(paused))
    assert sorted(c.task_id for c in claims) == sorted(others)
    assert not set(connectors) & {c.task_id for c in claims}
    both = Exclusions.of([*paused, LimitKey(scope=Scope.KEY, value="tenant:a")])
    async with outbox.claiming() as tx:
        claims = await tx.select_claimable(limit=20, now=utcnow(), excluding=both)
    assert sorted(c.task_id for c in claims) == sorted(others[1:])
