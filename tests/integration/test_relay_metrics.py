"""A relay's own metrics after a known workload, and RELAY_METRICS_PORT serving them."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from arq.connections import ArqRedis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from relay import metrics
from relay.relay import Relay
from tests.integration.test_relay_flow import outbox_of
from tests.integration.worker_harness import arq_pool, running_relay
from tests.support import submit_task, wait_for
from throttler.db import SessionFactory
from throttler.limits import LimitKey, RuleSet, Scope
from throttler.models import OutboxEntry, utcnow
from throttler.settings import Settings
from throttler.store.limits import ChangeKind, LimitStore
from throttler.throttle import Limiter, RedisLimiter, UnlimitedLimiter

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples() -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.REGISTRY).decode())
        for sample in family.samples
    }


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_releases_are_counted_by_task_name(
    settings: Settings, sessions: SessionFactory
) -> None:
    before = samples()
    async with sessions.begin() as session:
        for n in range(5):
            await submit_task(
                session, name="greeting", account="a", payload={"name": f"n{n}"}, now=utcnow()
            )
        for n in range(2):
            await submit_task(
                session,
                name="download",
                account="a",
                payload={"url": f"https://example.com/{n}"},
                host="example.com",
                now=utcnow(),
            )

    async def outbox_empty() -> bool:
        async with sessions() as session:
            return await session.scalar(select(func.count()).select_from(OutboxEntry)) == 0

    async with arq_pool(settings) as pool, running_relay(settings, sessions, pool):
        await wait_for(outbox_empty, message="the relay to release every task")
    after = samples()
    assert delta(before, after, "throttler_relay_released_total", task="greeting") == 5
    assert delta(before, after, "throttler_relay_released_total", task="download") == 2
    assert delta(before, after, "throttler_relay_claims_total") >= 1
    assert delta(before, after, "throttler_relay_enqueue_failures_total") == 0


@pytest.fixture
async def arq(redis_url: str) -> AsyncIterator[ArqRedis]:
    async with arq_pool(Settings(redis_url=redis_url)) as pool:
        yield pool


async def _submit_greetings(sessions: SessionFactory, count: int) -> None:
    async with sessions.begin() as session:
        for n in range(count):
            await submit_task(
                session, name="greeting", account="a", payload={"name": f"n{n}"}, now=utcnow()
            )


def _relay(
    settings: Settings,
    sessions: SessionFactory,
    arq: ArqRedis,
    *,
    limiter: Limiter | None = None,
    **overrides: object,
) -> Relay:
    return Relay(
        settings=Settings(**{**settings.model_dump(), **overrides}),
        outbox=outbox_of(settings, sessions),
        arq=arq,
        limiter=limiter or UnlimitedLimiter(),
    )


async def test_rows_held_back_by_a_cap_are_counted(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    await _submit_greetings(sessions, 5)
    before = samples()
    relay = _relay(settings, sessions, arq, relay_max_inflight=2)
    batch = await relay.claim()
    assert len(batch.to_enqueue) == 2
    after = samples()
    assert delta(before, after, "throttler_relay_held_back_total", reason="inflight") == 3
    assert delta(before, after, "throttler_relay_held_back_total", reason="rate") == 0


async def test_rows_held_back_by_a_rate_are_counted(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    await _submit_greetings(sessions, 5)
    before = samples()
    limiter = RedisLimiter(redis=arq, rules=RuleSet.parse("cluster rate=0.6/m burst=2"))
    relay = _relay(settings, sessions, arq, limiter=limiter)
    batch = await relay.claim()
    assert len(batch.to_enqueue) == 2
    after = samples()
    assert delta(before, after, "throttler_relay_held_back_total", reason="rate") == 3
    assert delta(before, after, "throttler_relay_held_back_total", reason="inflight") == 0


@pytest.fixture
def scope_registry(monkeypatch: pytest.MonkeyPatch) -> CollectorRegistry:
    """A fresh ``ScopeReleases`` for the relays of one test, in a registry of its own: the
    busiest values are then this test's alone."""
    fresh = metrics.ScopeReleases()
    monkeypatch.setattr(metrics, "SCOPE_RELEASES", fresh)
    registry = CollectorRegistry()
    registry.register(fresh)
    return registry


def scope_releases(registry: CollectorRegistry) -> dict[str, float]:
    """``throttler_relay_scope_released_total`` by scope, read by prometheus-client."""
    text = generate_latest(registry).decode()
    return {
        sample.labels["scope"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "throttler_relay_scope_released_total"
    }


async def _submit_downloads(sessions: SessionFactory, per_host: dict[str, int]) -> None:
    async with sessions.begin() as session:
        for host, count in per_host.items():
            for n in range(count):
                await submit_task(
                    session,
                    name="download",
                    account="a",
                    payload={"url": f"https://{host}/{n}"},
                    host=host,
                    now=utcnow(),
                )


def _with(settings: Settings, **overrides: object) -> Settings:
    return Settings(**{**settings.model_dump(), **overrides})


async def _drained(sessions: SessionFactory, *, left: int = 0) -> bool:
    async with sessions() as session:
        return await session.scalar(select(func.count()).select_from(OutboxEntry)) == left


async def test_releases_are_counted_per_limited_scope(
    settings: Settings, sessions: SessionFactory, scope_registry: CollectorRegistry
) -> None:
    await _submit_downloads(sessions, {"a.example": 3, "b.example": 2})
    await _submit_greetings(sessions, 4)
    limited = _with(settings, relay_limits="host:* inflight=100; task:download inflight=100")
    async with arq_pool(settings) as pool, running_relay(limited, sessions, pool):
        await wait_for(lambda: _drained(sessions), message="the relay to release every task")

    async def counted() -> dict[str, float] | None:
        found = scope_releases(scope_registry)
        return found if sum(found.values()) == 10 else None

    # Counted once each batch's enqueue settles, just after its rows are released.
    found = await wait_for(counted, message="every release to be counted")
    # Only limited scopes: no rule names greeting, and the cluster has none.
    assert found == {"host:a.example": 3, "host:b.example": 2, "task:download": 5}


async def test_a_paused_scope_releases_nothing_and_is_counted_as_held_back(
    settings: Settings,
    sessions: SessionFactory,
    engine: AsyncEngine,
    arq: ArqRedis,
    scope_registry: CollectorRegistry,
) -> None:
    await _submit_downloads(sessions, {"a.example": 3, "b.example": 2})
    now = utcnow()
    await LimitStore(engine).change(
        ChangeKind.PAUSE,
        key=LimitKey(scope=Scope.HOST, value="b.example"),
        by="ops",
        now=now,
        paused_until=now.replace(year=2099),
    )
    before = samples()
    relay = _relay(settings, sessions, arq, relay_limits="host:* inflight=100")
    await relay.step()
    await relay.flush()
    after = samples()
    assert await _drained(sessions, left=2)
    assert scope_releases(scope_registry) == {"host:a.example": 3}
    assert delta(before, after, "throttler_relay_held_back_total", reason="paused") >= 1
    for reason in ("inflight", "queue_full", "rate"):
        assert delta(before, after, "throttler_relay_held_back_total", reason=reason) == 0


async def test_claims_the_queue_room_cuts_short_are_counted(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    await _submit_greetings(sessions, 5)
    before = samples()
    relay = _relay(settings, sessions, arq, relay_max_queue_depth=2)
    assert len((await relay.claim()).to_enqueue) == 2
    # The two leased rows fill the queue's room: this claim takes nothing.
    assert len((await relay.claim()).to_enqueue) == 0
    after = samples()
    assert delta(before, after, "throttler_relay_held_back_total", reason="queue_full") == 2
    assert delta(before, after, "throttler_relay_held_back_total", reason="inflight") == 0
    assert delta(before, after, "throttler_relay_held_back_total", reason="paused") == 0


async def test_each_wildcard_shows_only_its_busiest_values(
    settings: Settings, sessions: SessionFactory, scope_registry: CollectorRegistry
) -> None:
    per_host = {"h1.example": 5, "h2.example": 4, "h3.example": 3, "h4.example": 2, "h5.example": 1}
    await _submit_downloads(sessions, per_host)
    limited = _with(
        settings,
        relay_limits="host:* inflight=100; host:h5.example inflight=9",
        metrics_top_scopes=2,
    )
    async with arq_pool(settings) as pool, running_relay(limited, sessions, pool):
        await wait_for(lambda: _drained(sessions), message="the relay to release every task")

    async def counted() -> dict[str, float] | None:
        found = scope_releases(scope_registry)
        return found if metrics.SCOPE_RELEASES.tracked() == 4 else None

    found = await wait_for(counted, message="every release to be counted")
    # The two busiest of host:*, and h5's own rule whatever its count.
    assert found == {"host:h1.example": 5, "host:h2.example": 4, "host:h5.example": 1}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_the_metrics_port_serves_the_registry() -> None:
    port = _free_port()
    metrics.serve_metrics(port, addr="127.0.0.1")
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            try:
                response = await client.get(f"http://127.0.0.1:{port}/metrics")
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("nothing listens on the metrics port")
    assert response.status_code == 200
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"throttler_relay_released", "throttler_relay_claims"} <= names
