"""Live nodes: every relay and worker registers itself and heartbeats; anyone may list them.

Kept in Redis, not in a table:

* a heartbeat is a write every ``HEARTBEAT_INTERVAL_S`` per process; on SQLite's single
  writer each one would queue behind the intake's and the relay's commits (and cost an
  fsync), while in Redis it is one pipelined round trip;
* every relay and worker already needs Redis, so a node that cannot reach it is not
  doing useful work anyway; and a Redis restarted empty loses the registrations only
  until the next heartbeat, ``HEARTBEAT_INTERVAL_S`` later, which is fine for liveness.

ARQ's own health check (``<queue>:health-check``) is one key per queue, overwritten by
whichever worker wrote last, so it cannot tell workers apart and knows nothing of relays.

Each node is a hash (``NODE_KEY_PREFIX<kind>:<id>``: host, pid, started_at, last_seen and,
for workers, running) plus a member of the sorted set ``NODES_INDEX_KEY`` scored by its last
heartbeat, so listing reads the index instead of scanning the keyspace (ARQ's job keys
live there too). A node is *alive* while its last heartbeat is at most ``ALIVE_WITHIN_S``
old (three heartbeats: one late or lost beat does not mark it dead). A node that died
stays listed, ``alive: false``, for ``FORGET_AFTER_S`` so an operator sees that it died;
then the hash's TTL and the next listing drop it. A node that stops cleanly deregisters.

``last_seen`` is written with the node's clock and judged with the reader's: hosts are
assumed to keep their clocks in step (NTP), well within ``ALIVE_WITHIN_S``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from throttler.constants import NODE_KEY_PREFIX, NODES_INDEX_KEY
from throttler.errors import REDIS_ERRORS
from throttler.logs import fields
from throttler.periodic import Periodic

# Every process writes its heartbeat this often.
HEARTBEAT_INTERVAL_S = 2.0
# Alive while the last heartbeat is at most this old: three heartbeats.
ALIVE_WITHIN_S = 3 * HEARTBEAT_INTERVAL_S
# A node that stopped heartbeating is listed as dead this long, then forgotten.
FORGET_AFTER_S = 600.0
# A clean stop waits at most this long to deregister (Redis may be away by then).
DEREGISTER_TIMEOUT_S = 2.0


class NodeKind(StrEnum):
    RELAY = "relay"
    WORKER = "worker"


@dataclass(frozen=True, kw_only=True, slots=True)
class Node:
    """What a process says about itself when it registers."""

    kind: NodeKind
    id: str
    host: str
    pid: int
    started_at: float  # Unix time

    @classmethod
    def this_process(cls, kind: NodeKind, node_id: str) -> Node:
        return cls(
            kind=kind,
            id=node_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=time.time(),
        )

    @property
    def member(self) -> str:
        return member_of(self.kind, self.id)


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeState:
    """A registered node as a reader sees it."""

    kind: NodeKind
    id: str
    host: str
    pid: int
    started_at: datetime
    last_seen: datetime
    alive: bool
    # Jobs running now, as of the last heartbeat; None for relays.
    running: int | None = None


def member_of(kind: NodeKind, node_id: str) -> str:
    return f"{kind.value}:{node_id}"


def _key(member: str) -> str:
    return f"{NODE_KEY_PREFIX}{member}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _moment(unix_s: float) -> datetime:
    return datetime.fromtimestamp(unix_s, UTC)


class NodeRegistry:
    """Register, heartbeat, deregister and list nodes in Redis.

    ``clock`` (Unix seconds) stamps heartbeats and judges liveness; tests move it.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        clock: Callable[[], float] = time.time,
        alive_within_s: float = ALIVE_WITHIN_S,
        forget_after_s: float = FORGET_AFTER_S,
    ) -> None:
        self.redis = redis
        self.clock = clock
        self.alive_within_s = alive_within_s
        self.forget_after_s = forget_after_s

    async def beat(self, node: Node, *, running: int | None = None) -> None:
        """Register ``node`` or refresh it: one round trip, all or nothing."""
        now = self.clock()
        mapping: dict[str, str | int | float] = {
            "kind": node.kind.value,
            "id": node.id,
            "host": node.host,
            "pid": node.pid,
            "started_at": node.started_at,
            "last_seen": now,
        }
        if running is not None:
            mapping["running"] = running
        key = _key(node.member)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=mapping)
            # The hash outlives a dead node by as long as it is listed dead.
            pipe.expire(key, max(1, round(self.forget_after_s)))
            pipe.zadd(NODES_INDEX_KEY, {node.member: now})
            await pipe.execute()

    async def deregister(self, node: Node) -> None:
        """Forget ``node`` at once: it stopped cleanly, it did not die."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(_key(node.member))
            pipe.zrem(NODES_INDEX_KEY, node.member)
            await pipe.execute()

    async def nodes(self, kind: NodeKind | None = None) -> list[NodeState]:
        """Every node seen within ``forget_after_s``, of ``kind`` if given, oldest first."""
        now = self.clock()
        await self.redis.zremrangebyscore(NODES_INDEX_KEY, "-inf", now - self.forget_after_s)
        members = [_text(member) for member in await self.redis.zrange(NODES_INDEX_KEY, 0, -1)]
        if kind is not None:
            members = [member for member in members if member.startswith(f"{kind.value}:")]
        if not members:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.hgetall(_key(member))
            hashes: list[Mapping[bytes | str, bytes | str]] = await pipe.execute()
        states = []
        gone = []
        for member, raw in zip(members, hashes, strict=True):
            if not raw:
                gone.append(member)  # its hash expired first: drop it from the index
                continue
            states.append(self._state({_text(k): _text(v) for k, v in raw.items()}, now=now))
        if gone:
            await self.redis.zrem(NODES_INDEX_KEY, *gone)
        states.sort(key=lambda state: state.started_at)
        return states

    def read_alive(self, pipe: Pipeline) -> None:
        """Queue the read of the live nodes' members on ``pipe`` (see ``alive_of``)."""
        pipe.zrangebyscore(NODES_INDEX_KEY, self.clock() - self.alive_within_s, "+inf")

    @staticmethod
    def alive_of(kind: NodeKind, members: Iterable[bytes | str]) -> list[str]:
        """The ids of the nodes of ``kind`` among what ``read_alive`` read."""
        prefix = member_of(kind, "")
        return [m[len(prefix) :] for m in map(_text, members) if m.startswith(prefix)]

    async def alive_ids(self, kind: NodeKind) -> list[str]:
        """The ids of the nodes of ``kind`` alive now: one read of the index alone."""
        async with self.redis.pipeline(transaction=False) as pipe:
            self.read_alive(pipe)
            [members] = await pipe.execute()
        return self.alive_of(kind, members)

    async def alive_count(self, kind: NodeKind) -> int:
        return sum(1 for state in await self.nodes(kind) if state.alive)

    def _state(self, values: Mapping[str, str], *, now: float) -> NodeState:
        last_seen = float(values["last_seen"])
        running = values.get("running")
        return NodeState(
            kind=NodeKind(values["kind"]),
            id=values["id"],
            host=values["host"],
            pid=int(values["pid"]),
            started_at=_moment(float(values["started_at"])),
            last_seen=_moment(last_seen),
            alive=now - last_seen <= self.alive_within_s,
            running=None if running is None else int(running),
        )


class Heartbeat(Periodic):
    """Keep one node registered until stopped, then deregister it.

    A heartbeat that fails (Redis away) is logged once per outage by ``Periodic`` and
    tried again next interval; it never stops the relay or worker it belongs to.
    """

    name = "nodes.heartbeat"

    def __init__(
        self,
        *,
        registry: NodeRegistry,
        node: Node,
        log: logging.Logger,
        running: Callable[[], int] | None = None,
        interval_s: float = HEARTBEAT_INTERVAL_S,
    ) -> None:
        super().__init__(interval_s=interval_s, log=log)
        self.registry = registry
        self.node = node
        self.running = running

    async def run_once(self) -> None:
        # A Redis that accepts but never answers must not hold the loop, nor the stop of
        # the process that waits for it: a beat later than an interval has failed anyway.
        async with asyncio.timeout(self.interval_s):
            await self.registry.beat(
                self.node, running=None if self.running is None else self.running()
            )

    async def run(self) -> None:
        try:
            await super().run()
        finally:
            await self._deregister()

    async def _deregister(self) -> None:
        try:
            async with asyncio.timeout(DEREGISTER_TIMEOUT_S):
                await self.registry.deregister(self.node)
        except REDIS_ERRORS as error:
            # It is then listed dead until forgotten: misleading, but harmless.
            self.log.warning(
                "nodes.deregister_failed", extra=fields(node=self.node.member, error=repr(error))
            )
