"""The Lua limiter against a real Redis: the same answers as the pure algorithm."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis

from throttler.constants import (
    RATE_BUCKET_KEY_PREFIX,
    RATE_DRAIN_FLOOR_KEY,
    RATE_GENERATION_KEY,
)
from throttler.limits import LimitKey, RuleSet, Scope
from throttler.throttle import (
    CLUSTER_KEY,
    NEVER_DRAINED,
    Bucket,
    BucketState,
    Candidate,
    RedisLimiter,
    Request,
    UnlimitedLimiter,
    build_limiter,
    decide,
    restart_floor,
)


def _random_buckets(rng: random.Random) -> list[Bucket]:
    scopes = [Scope.CLUSTER, Scope.TASK, Scope.ACCOUNT, Scope.HOST, Scope.HOST]
    buckets = []
    for index in range(rng.randint(1, 5)):
        scope = scopes[index]
        buckets.append(
            Bucket(
                key=LimitKey(scope=scope, value=None if scope is Scope.CLUSTER else f"v{index}"),
                rate_per_s=rng.choice([0.5, 3.0, 50.0, 1234.5, rng.uniform(0.1, 2000)]),
                burst=rng.choice([1, 2, 7, 100]),
            )
        )
    return buckets


@pytest.mark.parametrize("seed", range(8))
async def test_lua_agrees_with_python_step_by_step(redis: Redis, seed: int) -> None:
    rng = random.Random(seed)
    buckets = _random_buckets(rng)
    # What the database would say is the latest dispatch when Redis turns up empty.
    last_dispatch: list[float | None] = [None]

    async def latest() -> float | None:
        return last_dispatch[0]

    limiter = RedisLimiter(redis=redis, rules=RuleSet(()), last_dispatch=latest)
    states: list[BucketState | None] = [None] * len(buckets)
    # Unix-epoch-sized times, as Redis TIME gives, with gaps from none to refill-all.
    now_s = 1.7e9 + rng.uniform(0, 1e6)
    drained_at_s = NEVER_DRAINED
    # The server the script believes it runs on (its run_id), and the generation.
    server, generation = "server-0", 0
    new_generation = False
    snapshot: _Snapshot | None = None
    for step in range(150):
        rate = min(bucket.rate_per_s for bucket in buckets)
        now_s += rng.choice([0.0, rng.uniform(0, 2 / rate), rng.uniform(0, 5)])
        if rng.random() < 0.05:
            now_s -= rng.uniform(0, 1)  # a step back: refills nothing on either side
        if step == 0 or rng.random() < 0.03:
            # Redis restarted empty: every bucket and the drain floor are gone.
            await redis.flushdb()
            states = [None] * len(buckets)
            drained_at_s, generation, new_generation = NEVER_DRAINED, 0, True
            last_dispatch[0] = rng.choice([None, now_s - rng.uniform(0, 200), now_s + 0.3])
        elif snapshot is not None and rng.random() < 0.05:
            # A failover to a replica that missed the latest writes (or a restart from an
            # older file): another server, holding an older copy of every key.
            await snapshot.restore(redis)
            server = f"server-{step}"
            states, drained_at_s, generation = list(snapshot.states), snapshot.floor, snapshot.gen
            new_generation = True
            last_dispatch[0] = rng.choice([None, now_s - rng.uniform(0, 200), now_s + 0.3])
        if rng.random() < 0.1:
            snapshot = await _Snapshot.take(
                redis, buckets, states, floor=drained_at_s, gen=generation
            )
        requests = [
            Request(
                buckets=tuple(rng.sample(range(len(buckets)), rng.randint(0, len(buckets)))),
                not_before_s=rng.choice([None, None, now_s + rng.uniform(-1, 3)]),
            )
            for _ in range(rng.choice([0, 1, 2, rng.randint(0, 40)]))
        ]
        horizon_s = rng.choice([0.0, 0.0, 0.5, rng.uniform(0, 3)])
        if rng.random() < 0.1:
            # A rule changed (PUT /limits): the saved state was counted at another rate.
            buckets = [
                Bucket(key=b.key, rate_per_s=rng.uniform(0.5, 50), burst=rng.randint(1, 10))
                if rng.random() < 0.5
                else b
                for b in buckets
            ]
        if new_generation:
            drained_at_s = restart_floor(
                last_dispatch_s=last_dispatch[0],
                now_s=now_s,
                horizon_s=horizon_s,
                previous_s=drained_at_s,
            )
            generation += 1
            new_generation = False
        expected = decide(
            states,
            buckets,
            requests,
            now_s=now_s,
            horizon_s=horizon_s,
            drained_at_s=drained_at_s,
            generation=generation,
        )
        got_now, got = await limiter.decide(
            buckets, requests, now_s=now_s, horizon_s=horizon_s, server=server
        )
        assert got_now == now_s
        assert got == expected, (now_s, requests)
        states = list(expected.states)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Snapshot:
    """Every limiter key as Redis held it at one step, and what the test expected then."""

    dumps: dict[str, bytes | None]
    states: tuple[BucketState | None, ...]
    floor: float
    gen: int

    @classmethod
    async def take(
        cls,
        redis: Redis,
        buckets: list[Bucket],
        states: list[BucketState | None],
        *,
        floor: float,
        gen: int,
    ) -> _Snapshot:
        keys = [*(b.redis_key for b in buckets), RATE_DRAIN_FLOOR_KEY, RATE_GENERATION_KEY]
        dumps = {key: await redis.dump(key) for key in keys}
        return cls(dumps=dumps, states=tuple(states), floor=floor, gen=gen)

    async def restore(self, redis: Redis) -> None:
        for key, dumped in self.dumps.items():
            await redis.delete(key)
            if dumped is not None:
                await redis.restore(key, 0, dumped)


async def test_one_call_judges_every_key_on_redis_time(redis: Redis) -> None:
    rules = RuleSet.parse(
        "host:* rate=1/s; task:download rate=2/s burst=3", cluster_rate_per_s=100, cluster_burst=2
    )
    limiter = RedisLimiter(redis=redis, rules=rules)
    slow = [
        Candidate(task_id=f"s{i}", name="download", account="a", host="slow.example")
        for i in range(3)
    ]
    greetings = [Candidate(task_id=f"g{i}", name="greeting", account="a") for i in range(2)]
    first = await limiter.admit([*slow, *greetings])
    # One token for the host; the greetings behind it are not held back.
    assert first.admitted == (slow[0], greetings[0])
    host_key = LimitKey(scope=Scope.HOST, value="slow.example")
    assert set(first.blocked) == {host_key, CLUSTER_KEY}
    assert first.blocked[host_key] == pytest.approx(1.0, abs=0.05)
    assert abs(first.granted_at_s - time.time()) < 5, "Redis TIME is wall-clock time"
    for key in ("cluster", "host:slow.example", "task:download"):
        assert await redis.exists(RATE_BUCKET_KEY_PREFIX + key)
    # The keys expire once a full refill would have made them redundant.
    assert 0 < await redis.pttl(RATE_BUCKET_KEY_PREFIX + "host:slow.example") <= 2000


async def test_a_token_due_within_the_horizon_is_taken_ahead(redis: Redis) -> None:
    # One token a minute: the second is a minute away however slow the machine is.
    limiter = RedisLimiter(
        redis=redis, rules=RuleSet.parse("", cluster_rate_per_s=1 / 60, cluster_burst=1)
    )
    greetings = [Candidate(task_id=f"g{i}", name="greeting", account="a") for i in range(3)]
    now = await limiter.admit(greetings[:2])
    assert now.admitted == (greetings[0],)
    assert now.ready_in_s == (0.0,)
    assert (await limiter.admit(greetings[1:2], horizon_s=30)).admitted == ()
    ahead = await limiter.admit(greetings[1:2], horizon_s=90)
    assert ahead.admitted == (greetings[1],)
    assert 30 < ahead.ready_in_s[0] <= 60
    # The reserved token is spent: the next one is two minutes away.
    assert (await limiter.admit(greetings[2:], horizon_s=90)).admitted == ()


async def test_buckets_lost_with_redis_come_back_drained_to_the_last_dispatch(
    redis: Redis,
) -> None:
    asked: list[str] = []

    async def dispatched_just_now() -> float | None:
        asked.append("db")
        return time.time()

    rules = RuleSet.parse("", cluster_rate_per_s=10, cluster_burst=5)
    limiter = RedisLimiter(redis=redis, rules=rules, last_dispatch=dispatched_just_now)
    greetings = [Candidate(task_id=f"g{i}", name="greeting", account="a") for i in range(5)]
    # Redis is empty: the database says the cluster was dispatching a moment ago, so the
    # buckets may have been drained (and lent ahead): no burst, and no token for 0.5 s.
    first = await limiter.admit(greetings, horizon_s=0.5)
    assert first.admitted == ()
    assert first.blocked[CLUSTER_KEY] > 0.5
    assert asked == ["db"]
    assert await redis.get(RATE_DRAIN_FLOOR_KEY) is not None
    # The floor is kept: later calls do not ask the database again.
    await limiter.admit(greetings, horizon_s=0.5)
    assert asked == ["db"]


async def test_a_new_cluster_gets_its_burst_at_once(redis: Redis) -> None:
    limiter = RedisLimiter(redis=redis, rules=RuleSet.parse("account:* rate=1/h burst=3"))
    batch = [Candidate(task_id=f"t{i}", name="greeting", account="a") for i in range(4)]
    assert len((await limiter.admit(batch)).admitted) == 3
    assert await redis.get(RATE_DRAIN_FLOOR_KEY) == b"-"


async def test_two_clients_share_one_bucket(redis: Redis, redis_url: str) -> None:
    other = Redis.from_url(redis_url)
    try:
        rules = RuleSet.parse("account:* rate=1/h burst=4")
        one = RedisLimiter(redis=redis, rules=rules)
        two = RedisLimiter(redis=other, rules=rules)
        batch = [Candidate(task_id=f"t{i}", name="greeting", account="a") for i in range(3)]
        a = await one.admit(batch)
        b = await two.admit(batch)
        assert (len(a.admitted), len(b.admitted)) == (3, 1)
        # Another account has its own bucket.
        other_account = [Candidate(task_id="x", name="greeting", account="b")]
        assert len((await two.admit(other_account)).admitted) == 1
    finally:
        await other.aclose()


async def test_no_rate_rule_needs_no_redis() -> None:
    # Nothing listens on port 1: any Redis call would fail.
    unreachable = Redis.from_url("redis://127.0.0.1:1/0")
    try:
        rules = RuleSet.parse("account:* inflight=3", cluster_inflight=10)
        limiter = build_limiter(redis=unreachable, rules=rules)
        assert isinstance(limiter, UnlimitedLimiter)
        candidates = [Candidate(task_id="t", name="greeting", account="a")] * 50
        assert len((await limiter.admit(candidates)).admitted) == 50
    finally:
        await unreachable.aclose()
