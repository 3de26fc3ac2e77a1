"""The Lua token bucket against a real Redis: same answers as the pure algorithm."""

from __future__ import annotations

import random
import time

import pytest
from redis.asyncio import Redis

from throttler.constants import RATE_BUCKET_KEY_PREFIX
from throttler.throttle import (
    CLUSTER_BUCKET_KEY,
    BucketState,
    Candidate,
    RedisTokenBucket,
    UnlimitedLimiter,
    build_limiter,
    take,
)


@pytest.mark.parametrize("seed", range(6))
async def test_lua_agrees_with_python_step_by_step(redis: Redis, seed: int) -> None:
    rng = random.Random(seed)
    rate_per_s = rng.choice([0.5, 3.0, 50.0, 1234.5, rng.uniform(0.1, 2000)])
    burst = rng.choice([1, 2, 7, 100])
    bucket = RedisTokenBucket(redis=redis, rate_per_s=rate_per_s, burst=burst)
    state: BucketState | None = None
    # Unix-epoch-sized times, as Redis TIME gives, with gaps from none to refill-all.
    now_s = 1.7e9 + rng.uniform(0, 1e6)
    for _ in range(300):
        now_s += rng.choice([0.0, rng.uniform(0, 2 / rate_per_s), rng.uniform(0, 5)])
        if rng.random() < 0.05:
            now_s -= rng.uniform(0, 1)  # a step back: refills nothing on either side
        want = rng.choice([0, 1, 1, 2, rng.randint(0, 3 * burst)])
        horizon_s = rng.choice([0.0, 0.0, 0.2, rng.uniform(0, 3)])
        expected = take(
            state, now_s=now_s, want=want, rate_per_s=rate_per_s, burst=burst, horizon_s=horizon_s
        )
        got = await bucket.take(want=want, now_s=now_s, horizon_s=horizon_s)
        assert got == expected, (now_s, want)
        state = expected[0]


async def test_lua_uses_redis_time_by_default_and_keys_the_cluster_bucket(redis: Redis) -> None:
    bucket = RedisTokenBucket(redis=redis, rate_per_s=1.0, burst=3)
    candidates = [Candidate(task_id=f"t{i}", name="greeting", account="a") for i in range(5)]
    first = await bucket.admit(candidates)
    assert first.admitted == tuple(candidates[:3])
    assert 0 < first.wait_s <= 1.0
    assert first.granted_at_s is not None
    assert abs(first.granted_at_s - time.time()) < 5, "Redis TIME is wall-clock time"
    second = await bucket.admit(candidates)
    assert second.admitted == ()
    assert CLUSTER_BUCKET_KEY == RATE_BUCKET_KEY_PREFIX + "cluster"
    assert await redis.exists(CLUSTER_BUCKET_KEY)
    # The key expires once a full refill would have made it redundant.
    assert 0 < await redis.pttl(CLUSTER_BUCKET_KEY) <= 4000
    ahead = await bucket.admit(candidates, horizon_s=2.5)
    assert len(ahead.admitted) == 2
    assert 0 < ahead.ready_in_s[0] < ahead.ready_in_s[1] <= 2.5
    # In debt by two tokens: the key lives until the bucket would be full again.
    assert 4000 < await redis.pttl(CLUSTER_BUCKET_KEY) <= 6000


async def test_two_clients_share_one_bucket(redis: Redis, redis_url: str) -> None:
    other = Redis.from_url(redis_url)
    try:
        one = RedisTokenBucket(redis=redis, rate_per_s=0.001, burst=4)
        two = RedisTokenBucket(redis=other, rate_per_s=0.001, burst=4)
        _, a, _ = await one.take(want=3)
        _, b, _ = await two.take(want=3)
        assert (a, b) == (3, 1)
    finally:
        await other.aclose()


async def test_unlimited_needs_no_redis() -> None:
    # Nothing listens on port 1: any Redis call would fail.
    unreachable = Redis.from_url("redis://127.0.0.1:1/0")
    try:
        limiter = build_limiter(redis=unreachable, rate_per_s=0, burst=1)
        assert isinstance(limiter, UnlimitedLimiter)
        candidates = [Candidate(task_id="t", name="greeting", account="a")] * 50
        assert len((await limiter.admit(candidates)).admitted) == 50
        bucket = RedisTokenBucket(redis=unreachable, rate_per_s=0, burst=1)
        assert len((await bucket.admit(candidates)).admitted) == 50
    finally:
        await unreachable.aclose()
