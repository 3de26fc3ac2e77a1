"""A download's redirect hops under the rules in force (worker.hop_limits), on both
databases: a host rule or pause set through the API reaches the worker's hops without a
restart, as it reaches the relays."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.limits import Limit, LimitKey, Scope
from throttler.models import utcnow
from throttler.settings import Settings
from throttler.store.limits import ChangeKind, LimitStore
from worker.hop_limits import HopLimits, RedirectRefused
from worker.taskkit.errors import RetriableError


@pytest.fixture
async def hops(settings: Settings, engine: AsyncEngine) -> AsyncIterator[HopLimits]:
    opened = HopLimits.open(settings, engine)
    yield opened
    await opened.close()


def _host(name: str) -> LimitKey:
    return LimitKey(scope=Scope.HOST, value=name)


async def test_an_api_cap_on_a_host_refuses_the_hop(hops: HopLimits, engine: AsyncEngine) -> None:
    target = httpx.URL("http://capped.example/x")
    await hops.before_hop(target, paid={"origin.example"}, time_left_s=5)
    await LimitStore(engine).change(
        ChangeKind.SET, key=_host("capped.example"), by="ops", now=utcnow(), limit=Limit(inflight=1)
    )
    hops._cached.checked_at = float("-inf")  # as if LIMITS_CHECK_EVERY_S had passed
    with pytest.raises(RedirectRefused, match=r"capped\.example"):
        await hops.before_hop(target, paid={"origin.example"}, time_left_s=5)


async def test_an_api_rate_on_a_host_is_drawn_by_hops(hops: HopLimits, engine: AsyncEngine) -> None:
    await LimitStore(engine).change(
        ChangeKind.SET,
        key=_host("rated.example"),
        by="ops",
        now=utcnow(),
        limit=Limit(rate_per_s=1 / 3600, burst=1),
    )
    target = httpx.URL("http://rated.example/")
    await hops.before_hop(target, paid=set(), time_left_s=5)  # the bucket's one token
    with pytest.raises(RetriableError, match=r"rated\.example"):
        await hops.before_hop(target, paid=set(), time_left_s=1)


async def test_a_paused_host_holds_the_hop_until_the_pause_ends(
    hops: HopLimits, engine: AsyncEngine
) -> None:
    limits = LimitStore(engine)
    now = utcnow()
    paused_until = now + timedelta(seconds=0.4)
    await limits.change(
        ChangeKind.PAUSE, key=_host("paused.example"), by="ops", now=now, paused_until=paused_until
    )
    await hops.before_hop(httpx.URL("http://paused.example/"), paid=set(), time_left_s=5)
    # Not before the pause's end, however long the change itself took to commit (a
    # loaded machine); the small margin is the event loop's timer resolution.
    assert utcnow() >= paused_until - timedelta(milliseconds=20)
    # Longer than the download has left: tried again later.
    now = utcnow()
    await limits.change(
        ChangeKind.PAUSE, key=_host("*"), by="ops", now=now, paused_until=now + timedelta(hours=1)
    )
    hops._cached.checked_at = float("-inf")
    with pytest.raises(RetriableError, match="paused"):
        await hops.before_hop(httpx.URL("http://other.example/"), paid=set(), time_left_s=1)
