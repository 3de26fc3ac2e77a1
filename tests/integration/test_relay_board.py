"""The relay's board publisher (``relay.board``) against a real Redis, and one that is away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from relay.board import KEEP_AFTER_STEP_S, PRUNE_AFTER_S, PRUNE_EVERY_S, BoardPublisher
from tests.support import wait_for
from throttler.constants import WAITING_BOARDS_KEY
from throttler.limits import LimitKey, Scope
from throttler.waiting import WaitingBoard

GREETING = LimitKey(scope=Scope.TASK, value="greeting")


def _board(**verdicts: object) -> WaitingBoard:
    return WaitingBoard(relay_id="r1", written_at=datetime.now(UTC), **verdicts)  # type: ignore[arg-type]


async def _written(redis: Redis) -> WaitingBoard | None:
    raw = await redis.hget(WAITING_BOARDS_KEY, "r1")  # type: ignore[misc]
    return None if raw is None else WaitingBoard.decode(raw)


async def test_a_burst_of_claims_builds_few_boards_and_publishes_the_latest(redis: Redis) -> None:
    publisher = BoardPublisher(redis=redis, relay_id="r1")
    built: list[float] = []
    until = datetime.now(UTC) + timedelta(seconds=60)

    def builder(board: WaitingBoard) -> Callable[[], WaitingBoard]:
        def build() -> WaitingBoard:
            built.append(time.monotonic())
            return board

        return build

    started = time.monotonic()
    for index in range(200):  # claims far faster than the publisher looks
        latest = _board(rate={GREETING: until}) if index == 199 else _board()
        publisher.offer(builder(latest), keep_s=0.05)
        await asyncio.sleep(0.001)
    await wait_for(
        lambda: _has_rate(redis), timeout_s=5, message="the latest board written to Redis"
    )
    elapsed_s = time.monotonic() - started
    # One look at once, then at most one per interval (a quarter of a second).
    assert len(built) <= 2 + elapsed_s / 0.2, (len(built), elapsed_s)
    written = await _written(redis)
    assert written is not None
    assert written.expires_at is not None
    assert written.expires_at <= datetime.now(UTC) + timedelta(seconds=0.05 + KEEP_AFTER_STEP_S)
    await publisher.close()
    assert await _written(redis) is None


async def _has_rate(redis: Redis) -> bool:
    board = await _written(redis)
    return board is not None and GREETING in board.rate


async def test_a_relay_that_will_sleep_long_keeps_its_board_that_long(redis: Redis) -> None:
    publisher = BoardPublisher(redis=redis, relay_id="r1")
    publisher.offer(_board, keep_s=0.05)
    await wait_for(lambda: _written(redis), message="a first board")
    # Same verdicts, but the relay now sleeps a minute (its cluster bucket is empty).
    publisher.offer(_board, keep_s=60)

    async def kept_long() -> bool:
        board = await _written(redis)
        expires_at = None if board is None else board.expires_at
        return expires_at is not None and expires_at > datetime.now(UTC) + timedelta(seconds=60)

    await wait_for(kept_long, timeout_s=5, message="the board kept past the relay's sleep")
    await publisher.close()


async def test_a_redis_that_is_away_fails_no_claim(closed_port: int) -> None:
    away = Redis.from_url(f"redis://127.0.0.1:{closed_port}/0", socket_connect_timeout=0.5)
    publisher = BoardPublisher(redis=away, relay_id="r1")
    try:
        for _ in range(5):
            publisher.offer(_board, keep_s=0.05)  # returns at once, raises nothing
        task = publisher._task
        assert task is not None
        await asyncio.wait_for(task, timeout=5)  # the write failed quietly
        assert task.exception() is None
        await publisher.close()
    finally:
        await away.aclose()


async def test_a_relay_removes_boards_long_expired(redis: Redis) -> None:
    long_ago = datetime.now(UTC) - timedelta(seconds=PRUNE_AFTER_S + 1)
    for relay_id, expires_at in [("dead", long_ago), ("recent", datetime.now(UTC))]:
        board = WaitingBoard(relay_id=relay_id, written_at=long_ago, expires_at=expires_at)
        await redis.hset(WAITING_BOARDS_KEY, mapping={relay_id: board.encode()})  # type: ignore[misc]
    clock = [0.0]
    publisher = BoardPublisher(redis=redis, relay_id="r1", clock=lambda: clock[0])
    clock[0] = PRUNE_EVERY_S  # a prune is due with the next write
    publisher.offer(_board, keep_s=0.05)

    async def pruned() -> bool:
        fields = await redis.hkeys(WAITING_BOARDS_KEY)  # type: ignore[misc]
        return sorted(fields) == [b"r1", b"recent"]

    await wait_for(pruned, message="the dead relay's board removed")
    await publisher.close()
