"""The latest dispatch the database knows of: what a limiter that lost Redis starts from."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tests.support import submit_greetings
from throttler.claim import select_claimable
from throttler.db import SessionFactory
from throttler.dispatches import last_dispatch_from, last_dispatch_s
from throttler.models import utcnow
from throttler.outbox import lease_scheduled


async def test_nothing_dispatched_yet_is_none(sessions: SessionFactory) -> None:
    await submit_greetings(sessions, 2)
    assert await last_dispatch_s(sessions) is None


async def test_the_latest_moment_counts_even_when_it_lies_ahead(
    sessions: SessionFactory,
) -> None:
    await submit_greetings(sessions, 3)
    now = utcnow()
    # Tokens lent ahead: the relay schedules tasks up to its horizon in the future.
    moments = [now - timedelta(seconds=5), now + timedelta(seconds=0.4), now]
    async with sessions.begin() as session:
        claims = await select_claimable(session, limit=3, now=now)
        await lease_scheduled(session, claims=claims, queued_at=moments, relay_id="r1", lease_s=30)
    latest = await last_dispatch_from(sessions)()
    assert latest == pytest.approx(max(moments).timestamp(), abs=1e-3)
