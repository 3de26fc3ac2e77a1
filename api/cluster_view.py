"""The cluster as GET /metrics shows it: read from the database and Redis, then cached.

A scrape must cost little however many tasks the table holds, so it never waits on these
reads once a first view exists: ``ClusterViewCache.current`` answers with the cached view
and, when that is older than ``METRICS_REFRESH_S``, starts one refresh in the background
(stale-while-revalidate; at most one refresh runs at a time per process). The per-scope
series are bounded: every specific rule's key, plus the ``METRICS_TOP_SCOPES`` busiest
values (backlog + in flight + dispatched last minute) of each ``*`` rule. Scopes are
named as the relays' ``throttler_relay_scope_released_total`` names them (``cluster``,
``task:download``, ``host:example.com``, ``key:tenant:acme``: ``str(LimitKey)``); paused
scopes are listed whatever their rules, as few as the pauses set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from redis.asyncio import Redis

from api.relay_status import relay_status
from api.schemas import KeyStatus
from throttler.errors import REDIS_ERRORS
from throttler.limits_in_force import in_force
from throttler.logs import fields
from throttler.models import utcnow
from throttler.nodes import NodeKind, NodeRegistry
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.limits import LimitStore
from throttler.store.monitoring import MonitoringStore
from throttler.store.reads import ReadStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class ScopeSample:
    """One limited key: its counts and the caps of the rule it obeys."""

    scope: str  # "task:download", "host:example.com", "cluster", ...
    backlog: int
    inflight: int
    dispatched_last_minute: int
    inflight_cap: int | None
    rate_per_s: float | None


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterView:
    """Everything the cluster collector exposes, read at ``read_at`` (Unix time)."""

    read_at: float
    tasks_by_status: Mapping[str, int]
    outbox_backlog: int
    outbox_oldest_age_s: float
    scopes: tuple[ScopeSample, ...] = ()
    # Scopes paused now -> when their pauses end (Unix time): the admins' few.
    paused: Mapping[str, float] = field(default_factory=dict)
    # None: Redis could not be asked.
    relays_alive: int | None = None
    workers_alive: int | None = None
    workers_running: int | None = None


def _sample(status: KeyStatus) -> ScopeSample:
    return ScopeSample(
        scope=status.key,
        backlog=status.backlog,
        inflight=status.inflight,
        dispatched_last_minute=status.dispatched_last_minute,
        inflight_cap=status.limit.inflight,
        rate_per_s=status.limit.rate_per_s,
    )


def bounded_scopes(
    keys: list[KeyStatus], *, wildcard_rules: frozenset[str], top: int
) -> list[KeyStatus]:
    """Each specific rule's key, and the ``top`` busiest keys of each ``*`` rule.

    Busiest: the most backlog + in flight + dispatched last minute; ties by key, so the
    choice is stable between scrapes.
    """
    kept = [key for key in keys if key.rule not in wildcard_rules]
    by_rule: dict[str, list[KeyStatus]] = {}
    for key in keys:
        if key.rule in wildcard_rules:
            by_rule.setdefault(key.rule, []).append(key)
    for members in by_rule.values():
        members.sort(key=lambda k: (-(k.backlog + k.inflight + k.dispatched_last_minute), k.key))
        kept += members[:top]
    return kept


@dataclass(kw_only=True, slots=True)
class ClusterReader:
    """Reads one ``ClusterView`` from the database and Redis."""

    settings: Settings
    reads: ReadStore
    monitoring: MonitoringStore
    limits: LimitStore
    redis: Redis
    # The statuses counted, the others shown as 0; None: every status. A count of every
    # status reads the whole table, but in the background refresh only: the first scrape's
    # wait in bench.metrics_scrape (1,000,000 tasks) is what it costs.
    counted: tuple[TaskStatus, ...] | None = None

    async def _tasks_and_outbox(self) -> tuple[dict[str, int], int, float]:
        now = utcnow()
        counts = await self.monitoring.task_counts(statuses=self.counted)
        by_status = {status.value: counts.by_status.get(status, 0) for status in TaskStatus}
        oldest = counts.outbox_oldest
        age = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        return by_status, counts.outbox_backlog, age

    async def _nodes(self) -> tuple[int | None, int | None, int | None]:
        try:
            registry = NodeRegistry(self.redis)
            relays = await registry.alive_count(NodeKind.RELAY)
            workers = [node for node in await registry.nodes(NodeKind.WORKER) if node.alive]
        except REDIS_ERRORS:
            return None, None, None
        return relays, len(workers), sum(node.running or 0 for node in workers)

    async def read(self) -> ClusterView:
        by_status, backlog, oldest_age = await self._tasks_and_outbox()
        overrides = await self.limits.overrides()
        forced = in_force(self.settings.limit_rules, overrides.rows)
        rules = forced.rules
        relays, workers, running = await self._nodes()
        status = await relay_status(
            self.reads, rules=rules, account=None, now=utcnow(), alive_relays=relays
        )
        wildcard = frozenset(rule.text for rule in rules.rules if rule.is_each)
        keys = bounded_scopes(
            status.keys, wildcard_rules=wildcard, top=self.settings.metrics_top_scopes
        )
        if status.cluster is not None:
            keys.insert(0, status.cluster)
        return ClusterView(
            read_at=time.time(),
            tasks_by_status=by_status,
            outbox_backlog=backlog,
            outbox_oldest_age_s=oldest_age,
            scopes=tuple(_sample(key) for key in keys),
            paused={str(k): until.timestamp() for k, until in forced.paused_at(utcnow()).items()},
            relays_alive=relays,
            workers_alive=workers,
            workers_running=running,
        )


class ClusterViewCache:
    """The last ``ClusterView``, refreshed in the background once it is older than ``max_age_s``."""

    def __init__(self, reader: ClusterReader, *, max_age_s: float) -> None:
        self._reader = reader
        self._max_age_s = max_age_s
        self._view: ClusterView | None = None
        self._refreshing: asyncio.Task[None] | None = None

    @property
    def view(self) -> ClusterView | None:
        return self._view

    async def _refresh(self) -> None:
        try:
            self._view = await self._reader.read()
        except Exception as error:  # a failed refresh keeps the last view, logged
            log.warning("metrics.refresh_failed", extra=fields(error=repr(error)))

    async def current(self) -> ClusterView | None:
        """The cached view; the first call waits for one, later ones never wait."""
        if self._view is None:
            await self._start_refresh()
            return self._view
        if time.time() - self._view.read_at >= self._max_age_s:
            self._start_refresh_in_background()
        return self._view

    async def _start_refresh(self) -> None:
        self._start_refresh_in_background()
        assert self._refreshing is not None
        await asyncio.shield(self._refreshing)

    def _start_refresh_in_background(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh())

    async def close(self) -> None:
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
