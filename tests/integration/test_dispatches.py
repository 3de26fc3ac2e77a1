"""The latest dispatch the database knows of: what a limiter that lost Redis starts from."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support import submit_greetings
from throttler.claim import select_claimable
from throttler.db import SessionFactory
from throttler.dispatches import last_dispatch_from, last_dispatch_s
from throttler.models import utcnow
from throttler.outbox import lease_scheduled
from throttler.settings import Settings
from throttler.store.recovery import RecoveryStore, open_recovery


@pytest.fixture
def recovery(settings: Settings, engine: AsyncEngine) -> RecoveryStore:
    return open_recovery(settings, engine)


async def test_nothing_dispatched_yet_is_none(
    sessions: SessionFactory, recovery: RecoveryStore
) -> None:
    await submit_greetings(sessions, 2)
    assert await last_dispatch_s(recovery) is None


async def test_the_latest_moment_counts_even_when_it_lies_ahead(
    sessions: SessionFactory,
    recovery: RecoveryStore,
) -> None:
    await submit_greetings(sessions, 3)
    now = utcnow()
    # Tokens lent ahead: the relay schedules tasks up to its horizon in the future.
    moments = [now - timedelta(seconds=5), now + timedelta(seconds=0.4), now]
    async with sessions.begin() as session:
        claims = await select_claimable(session, limit=3, now=now)
        await lease_scheduled(session, claims=claims, queued_at=moments, relay_id="r1", lease_s=30)
    latest = await last_dispatch_from(recovery)()
    assert latest == pytest.approx(max(moments).timestamp(), abs=1e-3)
