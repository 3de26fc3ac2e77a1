"""GET /metrics: parsed with prometheus-client's own parser after a known workload."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from relay import metrics as relay_metrics
from tests.integration.test_api_relay_status import LIMITS, ROWS, add_task
from tests.integration.worker_harness import arq_pool, running_relay
from tests.support import submit_task, wait_for
from throttler.db import SessionFactory
from throttler.limits import LimitKey, Scope
from throttler.models import OutboxEntry, utcnow
from throttler.nodes import Node, NodeKind, NodeRegistry
from throttler.settings import Settings
from throttler.store.limits import ChangeKind, LimitStore

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

METRICS = "/metrics"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _limited(settings: Settings, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": settings.database_url,
        "redis_url": settings.redis_url,
        "relay_limits": LIMITS,
        "relay_rate": 10.0,
        "relay_burst": 5,
        "metrics_refresh_s": 0.05,
    }
    return Settings.model_validate(values | overrides)


async def scrape(client: httpx.AsyncClient) -> Samples:
    """Every sample of GET /metrics, by name and sorted labels, read by prometheus-client."""
    response = await client.get(METRICS)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {
        dict(labels)[label]: value for (found, labels), value in samples.items() if found == name
    }


@pytest.fixture
async def populated(sessions: SessionFactory) -> None:
    now = utcnow()
    for row in ROWS:
        await add_task(sessions, row, now=now)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_cluster_view_counts_the_known_workload(
    populated: None, settings: Settings, make_api_client: ApiClientFactory, redis: Redis
) -> None:
    registry = NodeRegistry(redis)
    await registry.beat(Node.this_process(NodeKind.RELAY, "relay-1"))
    await registry.beat(Node.this_process(NodeKind.WORKER, "worker-1"), running=3)
    await registry.beat(Node.this_process(NodeKind.WORKER, "worker-2"), running=1)
    async with make_api_client(_limited(settings)) as client:
        samples = await scrape(client)
    assert by_label(samples, "throttler_tasks", "status") == {
        "pending": 2,
        "queued": 2,
        "running": 1,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
    }
    # Every row is still in the outbox: marked queued, but no relay handed one to ARQ and
    # deleted its row (add_task stops there).
    assert samples[("throttler_outbox_backlog", ())] == len(ROWS)
    assert samples[("throttler_outbox_oldest_age_seconds", ())] >= 0
    assert samples[("throttler_relays_alive", ())] == 1
    assert samples[("throttler_workers_alive", ())] == 2
    assert samples[("throttler_workers_running_jobs", ())] == 4
    # Backlog, in flight and caps per scope: the same numbers as /relay/status.
    backlog = by_label(samples, "throttler_scope_backlog", "scope")
    inflight = by_label(samples, "throttler_scope_inflight", "scope")
    assert backlog["cluster"] == 2
    assert inflight["cluster"] == 3
    assert backlog["task:download"] == 1
    assert inflight["task:download"] == 2
    assert backlog["host:a.example"] == 1
    assert inflight["host:a.example"] == 1
    assert inflight["host:b.example"] == 1
    assert backlog["host:slow.example"] == 0
    assert backlog["account:beta"] == 1
    assert inflight["account:beta"] == 1
    caps = by_label(samples, "throttler_scope_inflight_cap", "scope")
    assert caps["task:download"] == 3
    assert caps["account:acme"] == 2
    assert caps["host:slow.example"] == 1
    rates = by_label(samples, "throttler_scope_rate_cap_per_second", "scope")
    assert rates["cluster"] == 10.0
    assert rates["host:a.example"] == 1.0
    dispatched = by_label(samples, "throttler_scope_dispatched_last_minute", "scope")
    # Queued 5 s, 30 s and 10 s ago: three downloads dispatched in the last minute.
    assert dispatched["task:download"] == 3


async def test_wildcard_scopes_keep_only_the_busiest_values(
    populated: None, settings: Settings, make_api_client: ApiClientFactory
) -> None:
    async with make_api_client(_limited(settings, metrics_top_scopes=1)) as client:
        samples = await scrape(client)
    scopes = set(by_label(samples, "throttler_scope_backlog", "scope"))
    # host:*: a.example (pending, queued, a success: 3) beats b.example (running: 1);
    # host:slow.example is a specific rule, shown with no task at all.
    assert {s for s in scopes if s.startswith("host:")} == {"host:a.example", "host:slow.example"}
    assert "task:download" in scopes
    assert "cluster" in scopes
    async with make_api_client(_limited(settings, metrics_top_scopes=0)) as client:
        samples = await scrape(client)
    scopes = set(by_label(samples, "throttler_scope_backlog", "scope"))
    assert {s for s in scopes if s.startswith("host:")} == {"host:slow.example"}
    assert {s for s in scopes if s.startswith("account:")} == {"account:acme"}


async def test_requests_are_counted_by_route_template_and_the_view_refreshes(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    async with make_api_client(_limited(settings)) as client:
        before = await scrape(client)
        assert by_label(before, "throttler_tasks", "status")["pending"] == 0
        for n in range(3):
            response = await client.post("/api/v1/task/greeting", json={"name": f"n{n}"})
            assert response.status_code == 202, response.text
        missing = await client.get("/api/v1/tasks/no-such-task")
        assert missing.status_code in (401, 404)
        await client.get("/no/such/path")
        # The cache refreshes in the background: wait for the new view, with a deadline.
        deadline = time.monotonic() + 10
        while True:
            samples = await scrape(client)
            if by_label(samples, "throttler_tasks", "status")["pending"] == 3:
                break
            assert time.monotonic() < deadline, "the cluster view never refreshed"
            await asyncio.sleep(0.05)
    requests = {
        (dict(labels)["method"], dict(labels)["route"], dict(labels)["code"]): value
        for (name, labels), value in samples.items()
        if name == "throttler_api_requests_total"
    }
    submits = [(key, v) for key, v in requests.items() if key[0] == "POST"]
    assert len(submits) == 1, submits
    (_method, route, code), count = submits[0]
    assert (code, count, route) == ("202", 3, "/api/v1/task/greeting")
    assert requests[("GET", "unmatched", "404")] == 1
    # Templates, never paths: no task id appears as a label.
    assert not any("no-such-task" in key[1] for key in requests)
    histogram = {
        dict(labels)["route"]: value
        for (name, labels), value in samples.items()
        if name == "throttler_api_request_duration_seconds_count"
        and dict(labels)["method"] == "POST"
    }
    assert histogram == {route: 3}


async def test_metrics_need_no_api_key(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    keyed = _limited(settings, api_keys="key-acme-0123456789:acme")
    async with make_api_client(keyed) as client:
        refused = await client.post("/api/v1/task/greeting", json={"name": "x"})
        assert refused.status_code == 401
        samples = await scrape(client)
    assert by_label(samples, "throttler_tasks", "status")["pending"] == 0


async def test_scopes_are_named_as_the_relays_name_them(
    settings: Settings,
    sessions: SessionFactory,
    make_api_client: ApiClientFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every kind of scope, specific and *, released by a real relay: the API's series and
    # the relay's own name the same scopes.
    limited = _limited(
        settings,
        relay_limits=(
            "host:* inflight=50; key:tenant:* inflight=50; account:acme inflight=50; "
            "task:download inflight=50"
        ),
        relay_rate=0.0,
        relay_max_inflight=100,
    )
    async with sessions.begin() as session:
        for n, (host, tenant) in enumerate(
            [("a.example", "acme"), ("a.example", "beta"), ("b.example", "acme")]
        ):
            await submit_task(
                session,
                name="download",
                account="acme",
                payload={"url": f"https://{host}/{n}"},
                host=host,
                labels=(f"tenant:{tenant}",),
                now=utcnow(),
            )
    releases = relay_metrics.ScopeReleases()
    monkeypatch.setattr(relay_metrics, "SCOPE_RELEASES", releases)
    relay_registry = CollectorRegistry()
    relay_registry.register(releases)

    def relay_scopes() -> dict[str, float]:
        text = generate_latest(relay_registry).decode()
        return {
            sample.labels["scope"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def all_counted() -> bool:
        async with sessions() as session:
            left = await session.scalar(select(func.count()).select_from(OutboxEntry))
        return left == 0 and relay_scopes().get("cluster") == 3

    async with arq_pool(settings) as pool, running_relay(limited, sessions, pool):
        await wait_for(all_counted, message="the relay to release and count every task")
    expected = {
        "cluster": 3,
        "account:acme": 3,
        "task:download": 3,
        "host:a.example": 2,
        "host:b.example": 1,
        "key:tenant:acme": 2,
        "key:tenant:beta": 1,
    }
    assert relay_scopes() == expected
    async with make_api_client(limited) as client:
        samples = await scrape(client)
    assert by_label(samples, "throttler_scope_inflight", "scope") == expected
    assert by_label(samples, "throttler_scope_dispatched_last_minute", "scope") == expected


async def test_paused_scopes_show_when_their_pauses_end(
    settings: Settings, engine: AsyncEngine, make_api_client: ApiClientFactory
) -> None:
    now = utcnow()
    until = now.replace(year=2099)
    limits = LimitStore(engine)
    # One paused scope without a rule of its own, one with; one pause already over.
    for key, end in (
        (LimitKey(scope=Scope.HOST, value="paused.example"), until),
        (LimitKey(scope=Scope.TASK, value="download"), until),
        (LimitKey(scope=Scope.ACCOUNT, value="over"), now.replace(year=2001)),
    ):
        await limits.change(ChangeKind.PAUSE, key=key, by="ops", now=now, paused_until=end)
    async with make_api_client(_limited(settings)) as client:
        samples = await scrape(client)
    paused = by_label(samples, "throttler_scope_paused_until_timestamp_seconds", "scope")
    assert paused == {
        "host:paused.example": until.timestamp(),
        "task:download": until.timestamp(),
    }
