"""The relay's board publisher (``relay.board``) against a real Redis, and one that is away."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from relay.board import KEEP_AFTER_STEP_S, BoardPublisher
from tests.support import wait_for
from throttler.limits import LimitKey, Scope
from throttler.waiting import WaitingBoard, board_key

GREETING = LimitKey(scope=Scope.TASK, value="greeting")


def _board(**verdicts: object) -> WaitingBoard:
    return WaitingBoard(relay_id="r1", written_at=datetime.now(UTC), **verdicts)  # type: ignore[arg-type]


async def _written(redis: Redis) -> WaitingBoard | None:
    raw = await redis.get(board_key("r1"))
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
    ttl_ms = await redis.pttl(board_key("r1"))
    assert 0 < ttl_ms <= (0.05 + KEEP_AFTER_STEP_S) * 1000
    await publisher.close()
    assert await redis.exists(board_key("r1")) == 0


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
        return int(await redis.pttl(board_key("r1"))) > 60_000

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
