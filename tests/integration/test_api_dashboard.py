"""GET /dashboard and GET /api/v1/dashboard: the page shell, and the summary's values for a
known workload on both databases, who sees what, and the plans of the summary's reads."""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy.dialects import sqlite

from api.dashboard.reads import FAILURES, LIVE_STATUSES
from api.dashboard.routes import CONTENT_SECURITY_POLICY
from api.dashboard.series import WINDOW_S
from tests.integration.test_api_relay_status import LIMITS, ROWS, Row, Stage, add_task
from tests.support import wait_for
from throttler.db import SessionFactory
from throttler.models import utcnow
from throttler.nodes import Node, NodeKind, NodeRegistry
from throttler.settings import Settings
from throttler.store.monitoring import (
    failures_statement,
    labels_statement,
    releases_statement,
    status_counts_statement,
)

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

SUMMARY = "/api/v1/dashboard"
KEY_ACME = "dash-key-acme-0123456789"
KEY_BETA = "dash-key-beta-0123456789"
KEY_OPS = "dash-key-ops-0123456789"


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


def _keyed(settings: Settings) -> Settings:
    return _limited(
        settings,
        api_keys=f"{KEY_ACME}:acme,{KEY_BETA}:beta,{KEY_OPS}:ops",
        api_admin_keys=KEY_OPS,
    )


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def populated(sessions: SessionFactory) -> tuple[datetime, dict[Row, str]]:
    """ROWS written at one moment: that moment, and each row's task id."""
    now = utcnow()
    ids = {}
    for row in ROWS:
        ids[row] = await add_task(sessions, row, now=now)
    return now, ids


@pytest.fixture
async def nodes(redis: Redis) -> AsyncIterator[None]:
    registry = NodeRegistry(redis)
    await registry.beat(Node.this_process(NodeKind.RELAY, "relay-1"))
    await registry.beat(Node.this_process(NodeKind.WORKER, "worker-1"), running=3)
    yield
    await redis.flushdb()


async def _summary(client: httpx.AsyncClient, key: str | None = None) -> dict[str, Any]:
    """The summary, once the finished counts (the metrics view, read apart) are in."""

    async def counted() -> dict[str, Any]:
        response = await client.get(SUMMARY, headers=_bearer(key) if key else {})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body if body["counts"]["succeeded"] is not None else {}

    return await wait_for(counted, timeout_s=10, message="the finished counts")


def _released(body: dict[str, Any], scope: str) -> dict[int, int]:
    """Seconds ago (from the series' last second) -> releases, where any."""
    values = body["releases"]["series"][scope]
    assert len(values) == WINDOW_S
    return {WINDOW_S - 1 - index: count for index, count in enumerate(values) if count}


def _seconds_ago(body: dict[str, Any], moment: datetime) -> int:
    last = int(body["releases"]["start"]) + WINDOW_S - 1
    return last - math.floor(moment.timestamp())


async def test_summary_shows_the_known_workload(
    populated: tuple[datetime, dict[Row, str]],
    nodes: None,
    settings: Settings,
    make_api_client: ApiClientFactory,
) -> None:
    now, ids = populated
    async with make_api_client(_limited(settings)) as client:
        paused = await client.post("/api/v1/limits/task:greeting/pause", json={"for_s": 600})
        assert paused.status_code == 200, paused.text
        body = await _summary(client)

    assert body["admin"] is True
    assert body["account"] == "default"
    assert body["counts"] == {
        "pending": 2,
        "queued": 2,
        "running": 1,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
    }
    assert body["finished_as_of"] is not None
    # add_task never deletes an outbox row (no relay handed one to ARQ).
    assert body["outbox_backlog"] == len(ROWS)
    scopes = {s["scope"]: s for s in body["scopes"]}
    assert (scopes["cluster"]["backlog"], scopes["cluster"]["inflight"]) == (2, 3)
    assert scopes["cluster"]["rate_per_s"] == 10.0
    assert scopes["task:download"] == {
        "scope": "task:download",
        "backlog": 1,
        "inflight": 2,
        "dispatched_last_minute": 3,
        "inflight_cap": 3,
        "rate_per_s": 5.0,
    }
    assert scopes["account:acme"]["inflight_cap"] == 2
    assert scopes["host:a.example"]["rate_per_s"] == 1.0
    # Releases: the queued events 5, 10 and 30 s before ``now``; the two 300 s before it
    # fell out of the five-minute window.
    ago = {s: _seconds_ago(body, now - timedelta(seconds=s)) for s in (5, 10, 30)}
    assert _released(body, "cluster") == {ago[5]: 1, ago[10]: 1, ago[30]: 1}
    assert _released(body, "task:download") == {ago[5]: 1, ago[10]: 1, ago[30]: 1}
    assert _released(body, "host:a.example") == {ago[5]: 1, ago[10]: 1}
    assert _released(body, "host:b.example") == {ago[30]: 1}
    assert _released(body, "account:acme") == {ago[5]: 1, ago[30]: 1}
    assert _released(body, "account:beta") == {ago[10]: 1}
    assert _released(body, "host:slow.example") == {}
    assert [p["scope"] for p in body["paused"]] == ["task:greeting"]
    assert [r["id"] for r in body["relays"]] == ["relay-1"]
    assert [(w["id"], w["running"]) for w in body["workers"]] == [("worker-1", 3)]
    failed = next(row for row in ROWS if row.stage is Stage.FAILED)
    assert body["failures"] == [
        {
            "task_id": ids[failed],
            "name": failed.name,
            "account": failed.account,
            "at": body["failures"][0]["at"],
            "error": "boom",
        }
    ]


async def test_new_releases_reach_the_series_of_a_running_api(
    sessions: SessionFactory, settings: Settings, make_api_client: ApiClientFactory
) -> None:
    async with make_api_client(_limited(settings)) as client:
        first = await _summary(client)
        assert _released(first, "cluster") == {}
        moment = utcnow()
        await add_task(
            sessions,
            Row(account="acme", name="greeting", stage=Stage.QUEUED),
            now=moment,
        )

        async def counted() -> dict[str, Any]:
            body: dict[str, Any] = (await client.get(SUMMARY)).json()
            return body if _released(body, "cluster") else {}

        body = await wait_for(counted, timeout_s=10, message="the release in the series")
    assert _released(body, "cluster") == {_seconds_ago(body, moment): 1}
    assert body["counts"]["queued"] == 1


async def test_keys_decide_what_the_summary_shows(
    populated: tuple[datetime, dict[Row, str]],
    settings: Settings,
    make_api_client: ApiClientFactory,
) -> None:
    _, ids = populated
    async with make_api_client(_keyed(settings)) as client:
        assert (await client.get(SUMMARY)).status_code == 401
        assert (await client.get(SUMMARY, headers=_bearer("nope"))).status_code == 401
        beta = await _summary(client, KEY_BETA)
        ops = await _summary(client, KEY_OPS)
        # A task of another account: 404 to an ordinary key, found by an admin key.
        gamma_task = next(ids[row] for row in ROWS if row.account == "gamma")
        hidden = await client.get(f"{SUMMARY}/tasks/{gamma_task}", headers=_bearer(KEY_BETA))
        found = await client.get(f"{SUMMARY}/tasks/{gamma_task}", headers=_bearer(KEY_OPS))
        # An ordinary key may not pause.
        refused = await client.post(
            "/api/v1/limits/cluster/pause", json={"for_s": 60}, headers=_bearer(KEY_BETA)
        )

    assert (beta["admin"], ops["admin"]) == (False, True)
    beta_accounts = {s["scope"] for s in beta["scopes"] if s["scope"].startswith("account:")}
    assert beta_accounts == {"account:beta"}
    assert not any(s.startswith("account:acme") for s in beta["releases"]["series"])
    ops_accounts = {s["scope"] for s in ops["scopes"] if s["scope"].startswith("account:")}
    assert ops_accounts == {"account:acme", "account:beta"}
    # The only failure is gamma's: every account's for the admin, none of beta's.
    assert [f["account"] for f in ops["failures"]] == ["gamma"]
    assert beta["failures"] == []
    assert hidden.status_code == 404
    assert found.status_code == 200
    assert found.json()["account"] == "gamma"
    assert refused.status_code == 403


async def test_task_answer_holds_the_view_the_reason_and_the_timeline(
    populated: tuple[datetime, dict[Row, str]],
    nodes: None,
    settings: Settings,
    make_api_client: ApiClientFactory,
) -> None:
    _, ids = populated
    succeeded = next(row for row in ROWS if row.stage is Stage.SUCCEEDED)
    pending = next(row for row in ROWS if row.stage is Stage.PENDING)
    async with make_api_client(_limited(settings)) as client:
        done = await client.get(f"{SUMMARY}/tasks/{ids[succeeded]}")
        waiting = await client.get(f"{SUMMARY}/tasks/{ids[pending]}")
        missing = await client.get(f"{SUMMARY}/tasks/no-such-task")
    assert done.status_code == 200, done.text
    assert done.json()["task"]["status"] == "succeeded"
    assert [e["event"] for e in done.json()["events"]] == [
        "submitted",
        "queued",
        "started",
        "succeeded",
    ]
    assert done.json()["account"] == succeeded.account
    # A relay is alive (``nodes``) with no board: nothing holds it back but its turn.
    assert waiting.json()["task"]["waiting"] == {"reason": "turn", "scope": None, "until": None}
    assert missing.status_code == 404


class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self.inline_styles = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.urls += [value for name, value in attrs if name in {"src", "href"} and value]
        self._in_script = tag == "script" and "src" not in found
        self.inline_styles += tag == "style" or "style" in found

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1


async def test_page_is_a_shell_of_same_origin_assets_open_to_anyone(
    populated: tuple[datetime, dict[Row, str]],
    settings: Settings,
    make_api_client: ApiClientFactory,
) -> None:
    _, ids = populated
    async with make_api_client(_keyed(settings)) as client:
        page = await client.get("/dashboard")
        parser = _References()
        parser.feed(page.text)
        assets = {url: await client.get(f"/{url}") for url in parser.urls if url != "data:,"}

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    # No data in the shell: no task, account or count.
    for text in [*ids.values(), "acme", "beta", "gamma"]:
        assert text not in page.text
    assert "://" not in page.text
    assert (parser.inline_scripts, parser.inline_styles) == (0, 0)
    assert sorted(assets) == ["dashboard/assets/dashboard.css", "dashboard/assets/dashboard.js"]
    for url, asset in assets.items():
        assert asset.status_code == 200, url
        assert "://" not in asset.text.replace("http://www.w3.org/2000/svg", ""), url
    assert (
        assets["dashboard/assets/dashboard.js"]
        .headers["content-type"]
        .startswith("text/javascript")
    )


# --- plans: the summary's reads stay on their indexes ------------------------------------


def _sqlite_plan(path: str, sql: str) -> list[str]:
    with sqlite3.connect(path) as connection:
        return [str(row[-1]) for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}")]


def _compiled(statement: Any) -> str:
    return str(statement.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_summary_reads_never_scan_tasks_on_sqlite(database_url: str) -> None:
    path = database_url.removeprefix("sqlite+aiosqlite:///")
    statements = {
        "series": releases_statement(dialect="sqlite", since=0, until=1),
        "labels": labels_statement(dialect="sqlite", since=0, until=1, labels=["tenant:a"]),
        "failures": failures_statement(account="acme", since=utcnow(), limit=FAILURES),
        "live counts": status_counts_statement(LIVE_STATUSES),
    }
    for name, statement in statements.items():
        plan = _sqlite_plan(path, _compiled(statement))
        scans = [line for line in plan if re.match(r"SCAN (tasks|task_events|task_labels)\b", line)]
        assert scans == [], f"{name}: {plan}"
