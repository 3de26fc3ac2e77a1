"""The node registry on a real Redis: register, heartbeat, alive or dead by last_seen, leave."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.asyncio import Redis

from tests.support import wait_for
from throttler.nodes import (
    ALIVE_WITHIN_S,
    FORGET_AFTER_S,
    Heartbeat,
    Node,
    NodeKind,
    NodeRegistry,
)

START = 1_800_000_000.0


class Clock:
    """Unix seconds that move only when told."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def _node(kind: NodeKind, node_id: str, *, pid: int = 42) -> Node:
    return Node(kind=kind, id=node_id, host="host-a", pid=pid, started_at=START)


async def test_a_registered_node_is_listed_alive_with_what_it_said(redis: Redis) -> None:
    clock = Clock()
    registry = NodeRegistry(redis, clock=clock)
    await registry.beat(_node(NodeKind.RELAY, "relay-1"))
    await registry.beat(_node(NodeKind.WORKER, "worker-1", pid=43), running=3)

    relays = await registry.nodes(NodeKind.RELAY)
    workers = await registry.nodes(NodeKind.WORKER)

    assert [(n.id, n.host, n.pid, n.alive, n.running) for n in relays] == [
        ("relay-1", "host-a", 42, True, None)
    ]
    assert [(n.id, n.pid, n.alive, n.running) for n in workers] == [("worker-1", 43, True, 3)]
    assert workers[0].started_at.timestamp() == START
    assert workers[0].last_seen.timestamp() == START
    assert len(await registry.nodes()) == 2


async def test_a_node_without_heartbeats_turns_dead_then_is_forgotten(redis: Redis) -> None:
    clock = Clock()
    registry = NodeRegistry(redis, clock=clock)
    await registry.beat(_node(NodeKind.RELAY, "relay-1"))

    clock.now += ALIVE_WITHIN_S
    assert [n.alive for n in await registry.nodes()] == [True]
    assert await registry.alive_count(NodeKind.RELAY) == 1

    clock.now += 0.5
    dead = await registry.nodes()
    assert [(n.id, n.alive) for n in dead] == [("relay-1", False)]
    assert dead[0].last_seen.timestamp() == START
    assert await registry.alive_count(NodeKind.RELAY) == 0

    clock.now = START + FORGET_AFTER_S + 1
    assert await registry.nodes() == []


async def test_a_heartbeat_brings_a_node_back_and_updates_running(redis: Redis) -> None:
    clock = Clock()
    registry = NodeRegistry(redis, clock=clock)
    worker = _node(NodeKind.WORKER, "worker-1")
    await registry.beat(worker, running=1)
    clock.now += ALIVE_WITHIN_S + 1
    assert [n.alive for n in await registry.nodes()] == [False]

    await registry.beat(worker, running=0)

    [state] = await registry.nodes()
    assert (state.alive, state.running, state.last_seen.timestamp()) == (True, 0, clock.now)


async def test_the_hash_expires_with_a_ttl_and_leaves_the_index(redis: Redis) -> None:
    registry = NodeRegistry(redis)
    node = _node(NodeKind.RELAY, "relay-1")
    await registry.beat(node)
    # Dead nodes are not kept for ever, even if nobody lists them.
    ttl = await redis.ttl(f"throttler:node:{node.member}")
    assert 0 < ttl <= FORGET_AFTER_S
    await redis.delete(f"throttler:node:{node.member}")

    assert await registry.nodes() == []
    assert await redis.zcard("throttler:nodes") == 0


async def test_deregister_forgets_the_node_at_once(redis: Redis) -> None:
    registry = NodeRegistry(redis)
    relay, worker = _node(NodeKind.RELAY, "relay-1"), _node(NodeKind.WORKER, "worker-1")
    await registry.beat(relay)
    await registry.beat(worker, running=0)

    await registry.deregister(relay)

    assert [n.id for n in await registry.nodes()] == ["worker-1"]


async def test_heartbeat_registers_at_once_and_deregisters_when_stopped(redis: Redis) -> None:
    registry = NodeRegistry(redis)
    running = 0
    heartbeat = Heartbeat(
        registry=registry,
        node=_node(NodeKind.WORKER, "worker-1"),
        log=logging.getLogger("test"),
        running=lambda: running,
        interval_s=0.05,
    )
    task = asyncio.create_task(heartbeat.run())

    async def listed_running(count: int) -> bool:
        return [n.running for n in await registry.nodes()] == [count]

    await wait_for(lambda: listed_running(0), message="worker registered")
    running = 2
    await wait_for(lambda: listed_running(2), message="running count refreshed")

    heartbeat.stop()
    await asyncio.wait_for(task, timeout=5)
    assert await registry.nodes() == []


async def test_heartbeats_without_redis_log_once_and_keep_going(
    closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{closed_port}/0")
    heartbeat = Heartbeat(
        registry=NodeRegistry(redis),
        node=_node(NodeKind.RELAY, "relay-1"),
        log=logging.getLogger("test.nodes"),
        interval_s=0.01,
    )
    with caplog.at_level(logging.DEBUG, logger="test.nodes"):
        task = asyncio.create_task(heartbeat.run())

        async def failed_a_few_times() -> bool:
            return sum(r.message == "nodes.heartbeat.error" for r in caplog.records) >= 3

        await wait_for(failed_a_few_times, message="several failed heartbeats")
        heartbeat.stop()
        await asyncio.wait_for(task, timeout=5)  # ends cleanly, deregister failure logged
    await redis.aclose()

    warnings = [r.message for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["nodes.heartbeat.error", "nodes.deregister_failed"]


async def test_a_redis_that_never_answers_does_not_hold_the_heartbeat_or_its_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts the connection, reads, never answers
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    redis = Redis.from_url(f"redis://127.0.0.1:{port}/0")
    heartbeat = Heartbeat(
        registry=NodeRegistry(redis),
        node=_node(NodeKind.WORKER, "worker-1"),
        log=logging.getLogger("test.silent"),
        interval_s=0.1,
    )
    try:
        with caplog.at_level(logging.WARNING, logger="test.silent"):
            task = asyncio.create_task(heartbeat.run())

            async def timed_out() -> bool:
                return any(r.message == "nodes.heartbeat.error" for r in caplog.records)

            await wait_for(timed_out, message="a heartbeat that timed out")
            heartbeat.stop()
            # The pass in hand times out within an interval, deregistering within its own.
            await asyncio.wait_for(task, timeout=10)
    finally:
        await redis.aclose()
        server.close()
    assert "nodes.deregister_failed" in [r.message for r in caplog.records]
