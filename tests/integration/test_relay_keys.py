"""``key:`` limits: the relay in process against a real database (both dialects) and Redis.

What is in flight is read back from ARQ's queue itself (no worker runs here: a task
handed over stays queued, holding its slots until the test finishes it).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.jobs import Job
from sqlalchemy import select

from relay.relay import Relay
from tests.integration.test_relay_flow import outbox_of
from tests.support import job_ids, record_success, start_attempt, submit_task, wait_for
from throttler.db import SessionFactory
from throttler.models import Task, utcnow
from throttler.settings import Settings
from throttler.throttle import build_limiter

STEPS = 12


@pytest.fixture
async def arq(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    yield pool
    await pool.aclose()


async def _submit(
    sessions: SessionFactory, labels: tuple[str, ...], count: int, *, account: str = "acme"
) -> list[str]:
    ids = []
    async with sessions.begin() as session:
        for index in range(count):
            task = await submit_task(
                session,
                name="greeting",
                account=account,
                payload={"name": f"n{index}"},
                now=utcnow(),
                labels=labels,
            )
            ids.append(task.id)
    return ids


def _relay(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis, **overrides: object
) -> Relay:
    # A fresh object, not model_copy: that would carry over a cached limit_rules.
    configured = Settings(**{**settings.model_dump(), **overrides})
    return Relay(
        settings=configured,
        outbox=outbox_of(configured, sessions),
        arq=arq,
        limiter=build_limiter(redis=arq, rules=configured.limit_rules),
    )


async def _in_arq(
    arq: ArqRedis, settings: Settings, sessions: SessionFactory, ids: Sequence[str]
) -> list[str]:
    """Which of ``ids`` have a job in ARQ's queue, in the order given."""
    async with sessions() as session:
        jobs = await job_ids(session, ids)
    queued = {job.decode() for job in await arq.zrange(settings.arq_queue_name, 0, -1)}
    return [task_id for task_id in ids if task_id in jobs and jobs[task_id] in queued]


async def _steps(relay: Relay, count: int = STEPS) -> None:
    for _ in range(count):
        await relay.step()
    await relay.flush()


async def _finish(sessions: SessionFactory, task_id: str) -> None:
    async with sessions.begin() as session:
        await start_attempt(session, task_id=task_id, worker_id="w", now=utcnow())
        await record_success(
            session, task_id=task_id, result={}, attempt=1, worker_id="w", now=utcnow()
        )


async def test_each_connector_has_its_own_inflight_cap_and_holds_back_nothing_else(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    # The oldest tasks of the one account are salesforce's: a claim of two rows at a time
    # that took them again and again, only to find their cap full, would starve the rest.
    salesforce = await _submit(sessions, ("connector:salesforce",), 6)
    hubspot = await _submit(sessions, ("connector:hubspot",), 4)
    pipedrive = await _submit(sessions, ("connector:pipedrive",), 3)
    plain = await _submit(sessions, (), 3)
    relay = _relay(
        settings,
        sessions,
        arq,
        relay_batch_size=2,
        relay_limits="key:connector:* inflight=2; key:connector:hubspot inflight=3",
    )
    await _steps(relay)

    assert await _in_arq(arq, settings, sessions, salesforce) == salesforce[:2]
    # The specific rule overrides the wildcard for its label.
    assert await _in_arq(arq, settings, sessions, hubspot) == hubspot[:3]
    assert await _in_arq(arq, settings, sessions, pipedrive) == pipedrive[:2]
    assert await _in_arq(arq, settings, sessions, plain) == plain
    assert await arq.zcard(settings.arq_queue_name) == 2 + 3 + 2 + 3

    # A salesforce task finishing frees one slot of salesforce's, and only one.
    await _finish(sessions, salesforce[0])
    await _steps(relay)
    assert await _in_arq(arq, settings, sessions, salesforce[1:]) == salesforce[1:3]
    assert await _in_arq(arq, settings, sessions, hubspot) == hubspot[:3]
    assert await arq.zcard(settings.arq_queue_name) == 2 + 3 + 2 + 3 + 1


async def test_a_task_with_two_labels_obeys_both_rules(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    first = await _submit(sessions, ("connector:x", "tenant:a"), 2)
    other_tenant = await _submit(sessions, ("connector:x", "tenant:b"), 2)
    other_connector = await _submit(sessions, ("connector:y", "tenant:a"), 1)
    fresh = await _submit(sessions, ("connector:z", "tenant:c"), 1)
    relay = _relay(
        settings,
        sessions,
        arq,
        relay_batch_size=2,
        relay_limits="key:connector:* inflight=2; key:tenant:* inflight=1",
    )
    await _steps(relay)
    everything = [*first, *other_tenant, *other_connector, *fresh]
    # first[0] fills tenant:a; other_tenant[0] then fills connector:x (2); the rest of
    # both wait, other_connector for tenant:a; fresh has room under both of its labels.
    assert await _in_arq(arq, settings, sessions, everything) == [first[0], other_tenant[0], *fresh]

    # tenant:a frees up, connector:x keeps one slot taken: the next of ``first`` goes (the
    # oldest), and then neither tenant:a nor connector:x has room for more.
    await _finish(sessions, first[0])
    await _steps(relay)
    # (A finished task's job stays in ARQ's queue here: no worker took it out.)
    assert await _in_arq(arq, settings, sessions, everything[1:]) == [
        first[1],
        other_tenant[0],
        *fresh,
    ]


async def test_a_tenants_tasks_are_spaced_by_its_rate_while_others_go_freely(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    acme = await _submit(sessions, ("tenant:acme",), 6)
    others = [
        *await _submit(sessions, ("tenant:other",), 3),
        *await _submit(sessions, (), 3),
        *await _submit(sessions, ("tenant:acme2",), 3, account="b"),
    ]
    relay = _relay(settings, sessions, arq, relay_limits="key:tenant:acme rate=5/s burst=1")
    running = asyncio.create_task(relay.run())
    everything = [*acme, *others]
    try:
        await wait_for(
            lambda: _all_in_arq(arq, settings, sessions, everything),
            timeout_s=15,
            message="every task handed to ARQ",
        )
    finally:
        relay.stop()
        await asyncio.wait_for(running, timeout=5)

    async with sessions() as session:
        jobs = await job_ids(session, everything)
        rows = await session.execute(select(Task.id, Task.queued_at).where(Task.id.in_(everything)))
        queued_at = {task_id: at.timestamp() for task_id, at in rows if at is not None}
    scores: dict[str, float] = {}
    for task_id in everything:
        info = await Job(jobs[task_id], arq).info()
        assert info is not None
        assert info.score is not None
        scores[task_id] = info.score / 1000
        # Runnable in ARQ from the moment its token fell due (ARQ keeps milliseconds).
        assert info.score == pytest.approx(queued_at[task_id] * 1000, abs=1)
    acme_times = sorted(scores[task_id] for task_id in acme)
    # One token each 0.2 s, as ARQ will start them.
    assert [round(b - a, 2) for a, b in itertools.pairwise(acme_times)] == [0.2] * 5
    # The others wait for no acme token: every one of them goes by acme's first moment.
    assert max(scores[task_id] for task_id in others) <= acme_times[0] + 0.01
    # Fairness unchanged: each account's tasks in age order.
    assert sorted(acme, key=scores.__getitem__) == acme


async def _all_in_arq(
    arq: ArqRedis, settings: Settings, sessions: SessionFactory, ids: Sequence[str]
) -> bool:
    return len(await _in_arq(arq, settings, sessions, ids)) == len(ids)
