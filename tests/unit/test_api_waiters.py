"""The long-poll registry: waking by id, and nothing left behind."""

from __future__ import annotations

import asyncio

import pytest

from api.waiters import Waiters
from tests.support import wait_for


async def test_wake_sets_every_waiter_on_the_id_and_only_those() -> None:
    waiters = Waiters()
    with waiters.watch("a") as first, waiters.watch("a") as second, waiters.watch("b") as other:
        assert len(waiters) == 3
        assert sorted(waiters.task_ids()) == ["a", "b"]

        assert waiters.wake(["a", "unknown"]) == 2

        assert first.is_set()
        assert second.is_set()
        assert not other.is_set()
    assert len(waiters) == 0
    assert waiters.task_ids() == []


async def test_a_waiter_leaving_keeps_the_others() -> None:
    waiters = Waiters()
    with waiters.watch("a") as staying:
        with waiters.watch("a"):
            pass
        assert waiters.task_ids() == ["a"]
        waiters.wake(["a"])
        assert staying.is_set()
    assert waiters.task_ids() == []


async def test_an_error_or_cancellation_unregisters() -> None:
    waiters = Waiters()

    async def wait_forever() -> None:
        with waiters.watch("a") as woken:
            await woken.wait()

    async def registered() -> bool:
        return len(waiters) == 1

    task = asyncio.create_task(wait_forever())
    await wait_for(registered, message="the waiter to register")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(waiters) == 0

    with pytest.raises(RuntimeError), waiters.watch("b"):
        raise RuntimeError("boom")
    assert len(waiters) == 0
