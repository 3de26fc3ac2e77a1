"""A limit change and the relays' claims, on both databases: a change that answered before
a claim began is obeyed by that very claim (the claim reads the version in its own
transaction), and on PostgreSQL a change waits for a claim holding the claims' lock (so a
claim never decides under rules older than a change that answered before it committed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from relay.relay import Relay
from tests.integration.test_relay_flow import outbox_of
from tests.support import submit_greetings, wait_for
from throttler.db import SessionFactory
from throttler.limits import Limit, LimitKey, RuleSet, Scope
from throttler.models import Task, utcnow
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.limits import ChangeKind, LimitStore
from throttler.throttle import Limiter, build_limiter

GREETING = LimitKey(scope=Scope.TASK, value="greeting")


@pytest.fixture
async def arq(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    yield pool
    await pool.aclose()


async def _queued(sessions: SessionFactory) -> int:
    async with sessions() as session:
        query = select(func.count()).select_from(Task).where(Task.status == TaskStatus.QUEUED)
        return int(await session.scalar(query) or 0)


def _relay(settings: Settings, sessions: SessionFactory, arq: ArqRedis, limits: str) -> Relay:
    configured = Settings(**{**settings.model_dump(), "relay_limits": limits})

    def limiter_for(rules: RuleSet) -> Limiter:
        return build_limiter(redis=arq, rules=rules)

    return Relay(
        settings=configured,
        outbox=outbox_of(configured, sessions),
        arq=arq,
        limiter=limiter_for(configured.limit_rules),
        limiter_for=limiter_for,
    )


async def test_a_claim_obeys_a_change_that_answered_before_it(
    settings: Settings, sessions: SessionFactory, engine: AsyncEngine, arq: ArqRedis
) -> None:
    await submit_greetings(sessions, 10)
    relay = _relay(settings, sessions, arq, "task:greeting inflight=100")
    limits = LimitStore(engine)
    # Started under inflight=100; a cap of 2 answers before its claim.
    await limits.change(
        ChangeKind.SET, key=GREETING, by="ops", now=utcnow(), limit=Limit(inflight=2)
    )
    await relay.step()
    await relay.flush()
    assert await _queued(sessions) == 2
    # Raised: the next claim takes the rest at once, with no restart.
    await limits.change(
        ChangeKind.SET, key=GREETING, by="ops", now=utcnow(), limit=Limit(inflight=100)
    )
    await relay.step()
    await relay.flush()
    assert await _queued(sessions) == 10


async def test_a_pause_answered_before_a_claim_holds_it_and_a_resume_frees_it(
    settings: Settings, sessions: SessionFactory, engine: AsyncEngine, arq: ArqRedis
) -> None:
    await submit_greetings(sessions, 5)
    relay = _relay(settings, sessions, arq, "")
    limits = LimitStore(engine)
    now = utcnow()
    await limits.change(
        ChangeKind.PAUSE, key=GREETING, by="ops", now=now, paused_until=now.replace(year=2099)
    )
    await relay.step()
    await relay.flush()
    assert await _queued(sessions) == 0
    await limits.change(ChangeKind.RESUME, key=GREETING, by="ops", now=utcnow())
    await relay.step()
    await relay.flush()
    assert await _queued(sessions) == 5


@pytest.mark.postgres
async def test_on_postgres_a_change_waits_for_a_claim_holding_the_lock(
    settings: Settings, sessions: SessionFactory, engine: AsyncEngine
) -> None:
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("SQLite runs one writer at a time: a change cannot begin during a claim")
    outbox = outbox_of(settings, sessions)
    limits = LimitStore(engine)
    async with outbox.claiming() as claim:
        await claim.serialize()
        before = await claim.limits_version()
        change = asyncio.create_task(
            limits.change(
                ChangeKind.SET, key=GREETING, by="ops", now=utcnow(), limit=Limit(inflight=1)
            )
        )
        done, _ = await asyncio.wait([change], timeout=0.5)
        assert not done  # waiting for the claim's lock
        assert await claim.limits_version() == before
    await asyncio.wait_for(change, timeout=5)
    async with outbox.claiming() as claim:
        await claim.serialize()
        assert await claim.limits_version() == before + 1


class _CountingRelay(Relay):
    steps = 0

    async def step(self) -> datetime:
        self.steps += 1
        return await super().step()


async def test_an_idle_relay_told_of_a_change_does_not_spin(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    configured = Settings(**{**settings.model_dump(), "relay_poll_interval_s": 0.05})
    relay = _CountingRelay(
        settings=configured,
        outbox=outbox_of(configured, sessions),
        arq=arq,
        limiter=build_limiter(redis=arq, rules=configured.limit_rules),
    )
    running = asyncio.create_task(relay.run())

    async def idling() -> bool:
        # Past the first steps, which recover and sweep: the next ones are spared.
        return relay.steps >= 3

    await wait_for(idling, message="an idle relay")
    relay.limits_changed()  # nothing pending: the claims are spared, the news is heard
    before = relay.steps
    # An observation window, not a wait for a condition: the relay's pace over it.
    await asyncio.sleep(0.5)
    relay.stop()
    await running
    # About one step per poll interval (10 in 0.5 s), not one per event-loop turn.
    assert relay.steps - before <= 20, relay.steps - before
