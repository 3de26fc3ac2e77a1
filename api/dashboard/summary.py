"""The dashboard's summary: read once a second at most, whatever the number of pages open.

Every open page polls ``GET /api/v1/dashboard`` once a second. What does not depend on the
caller (live counts, scopes, releases per second, pauses, nodes) is one ``Refreshed`` value
per API process, and the recent failures one per account (every account's for admin
keys): a poll answers from them at once, and one finding them older than ``REFRESH_S``
starts a single refresh in the background (the first poll waits for the first read).

The finished counts (succeeded, failed, cancelled) read the whole table, so the dashboard
takes them from the ``GET /metrics`` view (``api.cluster_view``), refreshed in the
background at most every ``METRICS_REFRESH_S``; until its first read they are null.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, TypeVar

from redis.asyncio import Redis

from api.admin import Caller
from api.cluster_view import ClusterReader, ClusterView, ClusterViewCache
from api.dashboard.reads import LIVE_STATUSES, DashboardReads
from api.dashboard.schemas import (
    DashboardPublic,
    FailurePublic,
    PausePublic,
    ReleasesPublic,
    ScopePublic,
)
from api.dashboard.series import ReleaseSeries, SeriesPublic
from api.schemas import NodePublic, WorkerNodePublic
from throttler.errors import REDIS_ERRORS
from throttler.limits import EACH, LimitKey, Scope
from throttler.limits_in_force import in_force
from throttler.logs import fields
from throttler.models import utcnow
from throttler.nodes import NodeKind, NodeRegistry, NodeState
from throttler.settings import Settings
from throttler.statuses import TERMINAL_STATUSES
from throttler.store.limits import LimitStore
from throttler.store.monitoring import Failure, MonitoringStore
from throttler.store.reads import ReadStore

log = logging.getLogger(__name__)

# A page polls once a second: a summary older than this is read again (in the background).
REFRESH_S = 1.0
T = TypeVar("T")


class Refreshed(Generic[T]):
    """The last value ``read`` gave, read again in the background once older than ``max_age_s``.

    The first ``current`` waits for a read (and raises what it raised); later ones never
    wait, and at most one read runs at a time. A failed refresh keeps the last value.
    """

    def __init__(self, read: Callable[[], Awaitable[T]], *, max_age_s: float, name: str) -> None:
        self._read = read
        self._max_age_s = max_age_s
        self._name = name
        self._value: T | None = None
        self._read_at = 0.0
        self._reading: asyncio.Task[T] | None = None

    async def _refresh(self) -> T:
        value = await self._read()
        self._value, self._read_at = value, time.monotonic()
        return value

    def _start(self) -> asyncio.Task[T]:
        if self._reading is None or self._reading.done():
            self._reading = asyncio.create_task(self._refresh())
            self._reading.add_done_callback(self._logged)
        return self._reading

    def _logged(self, reading: asyncio.Task[T]) -> None:
        if not reading.cancelled() and reading.exception() is not None and self._value is not None:
            log.warning(
                "dashboard.refresh_failed",
                extra=fields(part=self._name, error=repr(reading.exception())),
            )

    async def current(self) -> T:
        if self._value is None:
            return await asyncio.shield(self._start())
        if time.monotonic() - self._read_at >= self._max_age_s:
            self._start()
        return self._value

    async def close(self) -> None:
        if self._reading is not None and not self._reading.done():
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class Shared:
    """The part of the summary every caller shares."""

    as_of: datetime
    live: ClusterView
    finished: ClusterView | None
    releases: SeriesPublic
    paused: dict[LimitKey, datetime]
    nodes: list[NodeState] | None


class Dashboard:
    """Reads and caches the summary; owned by the API's lifespan."""

    def __init__(
        self,
        *,
        settings: Settings,
        reads: ReadStore,
        monitoring: MonitoringStore,
        limits: LimitStore,
        redis: Redis,
        cluster_view: ClusterViewCache,
    ) -> None:
        self.settings = settings
        self.limits = limits
        self.redis = redis
        self.reads = DashboardReads(monitoring)
        # The cluster view of the live statuses only: ranges of an index, never a scan.
        self._live = ClusterReader(
            settings=settings,
            reads=reads,
            monitoring=monitoring,
            limits=limits,
            redis=redis,
            counted=LIVE_STATUSES,
        )
        self._finished = cluster_view
        self._series = ReleaseSeries(monitoring)
        self._shared = Refreshed(self._read_shared, max_age_s=REFRESH_S, name="shared")
        self._failures: dict[str | None, Refreshed[list[Failure]]] = {}
        # The metrics view's first read, started by the first summary and not waited for.
        self._warming: asyncio.Task[ClusterView | None] | None = None

    async def _read_shared(self) -> Shared:
        live = await self._live.read()
        # Never waits once the metrics view exists; until then, starts its first read.
        finished = self._finished.view
        if finished is None:
            if self._warming is None or self._warming.done():
                self._warming = asyncio.create_task(self._finished.current())
        else:
            await self._finished.current()
        now = utcnow()
        labels = [
            value
            for sample in live.scopes
            if (value := sample.scope.partition(":")[2]) and sample.scope.startswith("key:")
        ]
        await self._series.refresh(now_s=now.timestamp(), labels=labels)
        overrides = await self.limits.overrides()
        paused = in_force(self.settings.limit_rules, overrides.rows).paused_at(now)
        return Shared(
            as_of=now,
            live=live,
            finished=finished,
            releases=self._series.series(
                [sample.scope for sample in live.scopes], now_s=now.timestamp()
            ),
            paused=paused,
            nodes=await self._nodes(),
        )

    async def _nodes(self) -> list[NodeState] | None:
        try:
            return await NodeRegistry(self.redis).nodes()
        except REDIS_ERRORS:
            return None

    def _failures_of(self, account: str | None) -> Refreshed[list[Failure]]:
        cached = self._failures.get(account)
        if cached is None:

            async def read() -> list[Failure]:
                return await self.reads.failures(account=account, now=utcnow())

            # One per account at most: accounts are the keys of API_KEYS, a bounded set.
            cached = self._failures[account] = Refreshed(read, max_age_s=REFRESH_S, name="failures")
        return cached

    async def summary(self, caller: Caller) -> DashboardPublic:
        """What ``caller`` may see: an ordinary key sees no other account's scope or task."""
        shared, failures = await asyncio.gather(
            self._shared.current(),
            self._failures_of(None if caller.admin else caller.account).current(),
        )

        def visible(scope: str) -> bool:
            kind, _, value = scope.partition(":")
            return caller.admin or kind != Scope.ACCOUNT.value or value in (caller.account, EACH)

        counts: dict[str, int | None] = dict(shared.live.tasks_by_status)
        for status in TERMINAL_STATUSES:
            finished = shared.finished
            counts[status.value] = (
                None if finished is None else finished.tasks_by_status.get(status.value, 0)
            )
        nodes = shared.nodes
        return DashboardPublic(
            as_of=shared.as_of,
            account=caller.account,
            admin=caller.admin,
            counts=counts,
            finished_as_of=(
                None
                if shared.finished is None
                else datetime.fromtimestamp(shared.finished.read_at, UTC)
            ),
            outbox_backlog=shared.live.outbox_backlog,
            outbox_oldest_age_s=shared.live.outbox_oldest_age_s,
            scopes=[
                ScopePublic(
                    scope=sample.scope,
                    backlog=sample.backlog,
                    inflight=sample.inflight,
                    dispatched_last_minute=sample.dispatched_last_minute,
                    inflight_cap=sample.inflight_cap,
                    rate_per_s=sample.rate_per_s,
                )
                for sample in shared.live.scopes
                if visible(sample.scope)
            ],
            releases=ReleasesPublic(
                start=shared.releases.start,
                step_s=shared.releases.step_s,
                series={
                    scope: values
                    for scope, values in shared.releases.series.items()
                    if visible(scope)
                },
            ),
            paused=[
                PausePublic(scope=str(key), until=until)
                for key, until in sorted(shared.paused.items(), key=lambda item: str(item[0]))
                if visible(str(key))
            ],
            relays=None if nodes is None else [_node(n) for n in nodes if n.kind is NodeKind.RELAY],
            workers=(
                None
                if nodes is None
                else [
                    WorkerNodePublic(**_node(n).model_dump(), running=n.running or 0)
                    for n in nodes
                    if n.kind is NodeKind.WORKER
                ]
            ),
            failures=[
                FailurePublic(
                    task_id=f.task_id, name=f.name, account=f.account, at=f.at, error=f.error
                )
                for f in failures
            ],
        )

    async def close(self) -> None:
        if self._warming is not None and not self._warming.done():
            self._warming.cancel()
            await asyncio.gather(self._warming, return_exceptions=True)
        await self._shared.close()
        for cached in self._failures.values():
            await cached.close()


def _node(state: NodeState) -> NodePublic:
    return NodePublic(
        id=state.id,
        host=state.host,
        pid=state.pid,
        started_at=state.started_at,
        last_seen=state.last_seen,
        alive=state.alive,
    )
