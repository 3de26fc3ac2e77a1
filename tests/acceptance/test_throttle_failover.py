"""Buckets that another Redis server holds now: no token taken before the change comes back.

Redis replicates asynchronously, so a replica promoted by a failover, or a Redis restarted
from an RDB or AOF file, may hold the buckets as they were before the latest takes. Each
test drains a bucket on one server, brings an older copy of the limiter's keys up on
another (or on the same one restarted from its file), and admits there: the limiter must
see that the server changed and grant no more than the drain floor from the database's
latest dispatch allows. Real redis-server processes on ports of their own.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from devtools.redis_server import free_port
from tests.acceptance.redis_servers import RedisProcess, answers, start_redis
from tests.support import wait_for
from throttler.limits import RuleSet
from throttler.throttle import CLUSTER_KEY, TAKE_AHEAD_LIMIT_S, Candidate, RedisLimiter

RATE, BURST = 1.0, 5
RULES = RuleSet.parse("", cluster_rate_per_s=RATE, cluster_burst=BURST)
# Every key the limiter keeps starts with this.
LIMITER_KEYS = "throttler:bucket*"


class Database:
    """What the relays' database would say: the latest dispatch the limiter granted."""

    def __init__(self) -> None:
        self.latest: float | None = None
        self.asked = 0

    async def last_dispatch(self) -> float | None:
        self.asked += 1
        return self.latest

    def record(self, admitted_at: list[float]) -> None:
        if admitted_at:
            self.latest = max(self.latest or admitted_at[0], *admitted_at)


def _start(workdir: Path, *arguments: str, port: int | None = None) -> RedisProcess:
    port = port or free_port()
    return start_redis(
        ["--port", str(port), "--bind", "127.0.0.1", "--appendonly", "no", *arguments],
        port=port,
        workdir=workdir,
        name=f"redis-{port}",
        ready=answers(host="127.0.0.1", port=port),
    )


@pytest.fixture
def servers() -> Iterator[list[RedisProcess]]:
    """The servers a test started: stopped after it."""
    started: list[RedisProcess] = []
    yield started
    for server in started:
        server.stop()


@pytest.fixture
def database() -> Database:
    return Database()


@pytest.fixture
async def clients() -> AsyncIterator[list[Redis]]:
    opened: list[Redis] = []
    yield opened
    for client in opened:
        await client.aclose()


def _client(server: RedisProcess, clients: list[Redis]) -> Redis:
    client = Redis(host="127.0.0.1", port=server.port)
    clients.append(client)
    return client


async def _admit(redis: Redis, database: Database, count: int) -> tuple[int, float]:
    """Ask for ``count`` greetings at once; how many went, and the cluster's wait."""
    limiter = RedisLimiter(redis=redis, rules=RULES, last_dispatch=database.last_dispatch)
    batch = [Candidate(task_id=f"t{i}", name="greeting", account="a") for i in range(count)]
    admission = await limiter.admit(batch)
    database.record([admission.granted_at_s + delay for delay in admission.ready_in_s])
    return len(admission.admitted), admission.blocked.get(CLUSTER_KEY, 0.0)


async def _dump(redis: Redis) -> dict[bytes, bytes]:
    dumps: dict[bytes, bytes] = {}
    async for key in redis.scan_iter(match=LIMITER_KEYS):
        dumped = await redis.dump(key)
        assert dumped is not None
        dumps[key] = dumped
    assert dumps, "the limiter wrote its keys"
    return dumps


def _assert_held_after_the_change(admitted: int, wait_s: float, *, drained: int) -> None:
    # Within about a second, ``drained`` tokens went on the first server; with the lost
    # takes granted again this window would hold twice the burst (the bound: about 6).
    assert drained == BURST
    assert admitted == 0, f"{admitted} tokens taken before the change were granted again"
    # No token until the drain floor set from the latest dispatch (a moment ago).
    assert wait_s > TAKE_AHEAD_LIMIT_S


async def test_an_older_copy_on_another_server_grants_nothing_taken_since(
    tmp_path: Path, servers: list[RedisProcess], clients: list[Redis], database: Database
) -> None:
    first = _start(tmp_path / "x", "--save", "")
    servers.append(first)
    on_first = _client(first, clients)
    assert (await _admit(on_first, database, 1))[0] == 1
    # A replica's copy from this moment: it never saw the takes below.
    copy = await _dump(on_first)
    drained, _ = await _admit(on_first, database, 10)
    drained += 1

    second = _start(tmp_path / "y", "--save", "")
    servers.append(second)
    on_second = _client(second, clients)
    for key, dumped in copy.items():
        await on_second.restore(key, 0, dumped)
    asked = database.asked
    admitted, wait_s = await _admit(on_second, database, 10)
    _assert_held_after_the_change(admitted, wait_s, drained=drained)
    assert database.asked == asked + 1, "the new server's floor comes from the database"
    # Later calls on the same server keep its generation: the database is not asked again.
    assert (await _admit(on_second, database, 1))[0] == 0
    assert database.asked == asked + 1


async def test_a_restart_from_an_older_rdb_file_grants_nothing_taken_since(
    tmp_path: Path, servers: list[RedisProcess], clients: list[Redis], database: Database
) -> None:
    workdir = tmp_path / "redis"
    port = free_port()
    server = _start(workdir, "--save", "", port=port)
    servers.append(server)
    client = _client(server, clients)
    assert (await _admit(client, database, 1))[0] == 1
    await client.save()  # the file a crash would restart from
    drained, _ = await _admit(client, database, 10)
    drained += 1
    server.kill()  # SIGKILL: the takes since the save are lost

    restarted = _start(workdir, "--save", "", port=port)
    servers.append(restarted)
    client = _client(restarted, clients)

    async def loaded() -> bool:
        return bool(await client.exists("throttler:bucket-drain-floor"))

    await wait_for(loaded, timeout_s=10, message="the RDB file to be loaded")
    admitted, wait_s = await _admit(client, database, 10)
    _assert_held_after_the_change(admitted, wait_s, drained=drained)


async def test_a_promoted_replica_starts_a_new_generation(
    tmp_path: Path, servers: list[RedisProcess], clients: list[Redis], database: Database
) -> None:
    master = _start(tmp_path / "master", "--save", "")
    servers.append(master)
    replica = _start(
        tmp_path / "replica", "--save", "", "--replicaof", "127.0.0.1", str(master.port)
    )
    servers.append(replica)
    on_master = _client(master, clients)
    on_replica = _client(replica, clients)
    drained, _ = await _admit(on_master, database, 10)
    assert drained == BURST
    # Every take reached the replica: nothing is lost, yet the limiter cannot know that.
    deadline = time.monotonic() + 10
    while await on_master.wait(1, 100) < 1:
        assert time.monotonic() < deadline, "the replica never acknowledged the writes"
    assert await on_replica.exists("throttler:bucket:cluster")
    await on_replica.replicaof("NO", "ONE")
    asked = database.asked
    admitted, wait_s = await _admit(on_replica, database, 10)
    assert admitted == 0
    assert wait_s > TAKE_AHEAD_LIMIT_S
    assert database.asked == asked + 1
