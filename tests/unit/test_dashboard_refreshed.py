"""api.dashboard.summary.Refreshed: however many pages poll, one read at a time."""

from __future__ import annotations

import asyncio

import pytest

from api.dashboard.summary import Refreshed
from tests.support import wait_for


class Reader:
    """Counts its reads; each waits for ``release`` and gives the next number."""

    def __init__(self) -> None:
        self.reads = 0
        self.release = asyncio.Event()
        self.fail = False

    async def read(self) -> int:
        self.reads += 1
        await self.release.wait()
        if self.fail:
            raise RuntimeError("database away")
        return self.reads


async def test_concurrent_first_calls_share_one_read() -> None:
    reader = Reader()
    cached = Refreshed(reader.read, max_age_s=60, name="test")
    callers = [asyncio.create_task(cached.current()) for _ in range(50)]
    await asyncio.sleep(0)
    reader.release.set()
    assert await asyncio.gather(*callers) == [1] * 50
    assert reader.reads == 1
    await cached.close()


async def test_a_stale_value_is_served_while_one_refresh_runs() -> None:
    reader = Reader()
    reader.release.set()
    cached = Refreshed(reader.read, max_age_s=0, name="test")
    assert await cached.current() == 1
    reader.release.clear()
    # Stale at once (max_age_s=0): every call answers the old value, one refresh starts.
    assert [await cached.current() for _ in range(20)] == [1] * 20
    await asyncio.sleep(0)  # the refresh starts
    assert [await cached.current() for _ in range(20)] == [1] * 20
    assert reader.reads == 2
    reader.release.set()

    async def refreshed() -> bool:
        return await cached.current() >= 2

    await wait_for(refreshed, timeout_s=5, message="the refreshed value")
    await cached.close()


async def test_a_failed_refresh_keeps_the_last_value_and_a_failed_first_read_raises() -> None:
    reader = Reader()
    reader.release.set()
    cached = Refreshed(reader.read, max_age_s=0, name="test")
    assert await cached.current() == 1
    reader.fail = True
    assert await cached.current() == 1

    async def tried() -> bool:
        # Each poll of a stale value starts a refresh; each fails and keeps the value.
        assert await cached.current() == 1
        return reader.reads >= 3

    await wait_for(tried, timeout_s=5, message="failed refreshes")
    await cached.close()

    failing = Reader()
    failing.release.set()
    failing.fail = True
    first = Refreshed(failing.read, max_age_s=60, name="test")
    with pytest.raises(RuntimeError, match="database away"):
        await first.current()
    await first.close()
