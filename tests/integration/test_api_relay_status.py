"""GET /api/v1/relay/status: per limited key, tasks waiting, in flight and just dispatched."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.support import record_failure, record_success, start_attempt, submit_task
from throttler.db import SessionFactory
from throttler.models import utcnow
from throttler.settings import Settings
from throttler.store.outbox import CoreClaim

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

STATUS = "/api/v1/relay/status"
LIMITS = (
    "task:download rate=5/s inflight=3; host:* rate=1/s; host:slow.example inflight=1; "
    "account:* inflight=20; account:acme inflight=2"
)
KEY_ACME = "key-acme-0123456789"
KEY_BETA = "key-beta-0123456789"


class Stage(Enum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, kw_only=True)
class Row:
    """One task to build: who submitted what, how far it got, when it was queued."""

    account: str
    name: str
    stage: Stage
    host: str | None = None
    queued_ago_s: float = 0.0


async def add_task(sessions: SessionFactory, row: Row, *, now: datetime) -> str:
    """Write a task through the real repository functions up to ``row.stage``."""
    payload: dict[str, Any] = {"url": f"https://{row.host}/"} if row.host else {"name": "x"}
    queued_at = now - timedelta(seconds=row.queued_ago_s)
    async with sessions.begin() as session:
        task = await submit_task(
            session,
            name=row.name,
            account=row.account,
            payload=payload,
            now=queued_at - timedelta(seconds=1),
            host=row.host,
        )
        if row.stage is not Stage.PENDING:
            await CoreClaim(session).mark_queued(
                task_ids=[task.id], relay_id="relay-t", now=queued_at
            )
        if row.stage in (Stage.RUNNING, Stage.SUCCEEDED, Stage.FAILED):
            attempt = await start_attempt(session, task_id=task.id, worker_id="w", now=queued_at)
            assert attempt is not None
        if row.stage is Stage.SUCCEEDED:
            await record_success(
                session, task_id=task.id, result={}, attempt=1, worker_id="w", now=queued_at
            )
        if row.stage is Stage.FAILED:
            await record_failure(
                session, task_id=task.id, error="boom", attempt=1, worker_id="w", now=queued_at
            )
    return task.id


ROWS = [
    Row(account="acme", name="download", host="a.example", stage=Stage.PENDING),
    Row(account="acme", name="download", host="a.example", stage=Stage.QUEUED, queued_ago_s=5),
    Row(account="acme", name="download", host="b.example", stage=Stage.RUNNING, queued_ago_s=30),
    Row(account="beta", name="download", host="a.example", stage=Stage.SUCCEEDED, queued_ago_s=10),
    Row(account="beta", name="greeting", stage=Stage.QUEUED, queued_ago_s=300),
    Row(account="beta", name="greeting", stage=Stage.PENDING),
    # Finished long ago: counted nowhere, so account:gamma is not listed.
    Row(account="gamma", name="blocking_long_running_task", stage=Stage.FAILED, queued_ago_s=300),
]


@pytest.fixture
async def populated(sessions: SessionFactory) -> None:
    now = utcnow()
    for row in ROWS:
        await add_task(sessions, row, now=now)


def _limited(settings: Settings, **overrides: Any) -> Settings:
    return Settings(
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        relay_limits=LIMITS,
        relay_rate=10.0,
        relay_burst=5,
        **overrides,
    )


@pytest.fixture
async def limited_client(
    settings: Settings, make_api_client: ApiClientFactory
) -> AsyncIterator[httpx.AsyncClient]:
    async with make_api_client(_limited(settings)) as client:
        yield client


@pytest.fixture
async def keyed_client(
    settings: Settings, make_api_client: ApiClientFactory
) -> AsyncIterator[httpx.AsyncClient]:
    keys = f"{KEY_ACME}:acme,{KEY_BETA}:beta"
    async with make_api_client(_limited(settings, api_keys=keys)) as client:
        yield client


def _numbers(entry: dict[str, Any]) -> tuple[int, int, int]:
    return (entry["backlog"], entry["inflight"], entry["dispatched_last_minute"])


def _by_key(body: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    return {entry["key"]: _numbers(entry) for entry in body["keys"]}


async def _status(client: httpx.AsyncClient, key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = await client.get(STATUS, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.usefixtures("populated")
async def test_counts_per_key_across_all_accounts(limited_client: httpx.AsyncClient) -> None:
    body = await _status(limited_client)

    assert body["account"] is None
    assert body["totals"] == {"pending": 2, "inflight": 3, "dispatched_last_minute": 3}
    cluster = body["cluster"]
    assert cluster["key"] == "cluster"
    assert cluster["rule"] == "RELAY_RATE=10 RELAY_BURST=5"
    assert cluster["limit"] == {"rate_per_s": 10.0, "burst": 5, "inflight": None}
    assert _numbers(cluster) == (2, 3, 3)
    # Specific rules always; `*` rules once per value with something to count; sorted.
    assert _by_key(body) == {
        "task:download": (1, 2, 3),
        "account:acme": (1, 2, 2),
        "account:beta": (1, 1, 1),
        "host:a.example": (1, 1, 2),
        "host:b.example": (0, 1, 1),
        "host:slow.example": (0, 0, 0),
    }
    assert [entry["key"] for entry in body["keys"]] == list(_by_key(body))
    rules = {entry["key"]: (entry["rule"], entry["limit"]) for entry in body["keys"]}
    assert rules["account:acme"] == (
        "account:acme inflight=2",
        {"rate_per_s": None, "burst": None, "inflight": 2},
    )
    assert rules["account:beta"][0] == "account:* inflight=20"
    assert rules["host:a.example"] == (
        "host:* rate=1/s",
        {"rate_per_s": 1.0, "burst": 1, "inflight": None},
    )
    assert rules["host:slow.example"][0] == "host:slow.example inflight=1"


@pytest.mark.usefixtures("populated")
async def test_with_api_keys_the_view_is_the_callers(keyed_client: httpx.AsyncClient) -> None:
    acme = await _status(keyed_client, KEY_ACME)

    assert acme["account"] == "acme"
    assert acme["totals"] == {"pending": 1, "inflight": 2, "dispatched_last_minute": 2}
    assert _numbers(acme["cluster"]) == (1, 2, 2)
    assert _by_key(acme) == {
        "task:download": (1, 2, 2),
        "account:acme": (1, 2, 2),
        "host:a.example": (1, 1, 1),
        "host:b.example": (0, 1, 1),
        "host:slow.example": (0, 0, 0),
    }

    beta = await _status(keyed_client, KEY_BETA)

    assert beta["account"] == "beta"
    assert beta["totals"] == {"pending": 1, "inflight": 1, "dispatched_last_minute": 1}
    # acme's own rule is not shown to beta; beta's account falls under account:*.
    assert _by_key(beta) == {
        "task:download": (0, 0, 1),
        "account:beta": (1, 1, 1),
        "host:a.example": (0, 0, 1),
        "host:slow.example": (0, 0, 0),
    }


@pytest.mark.usefixtures("populated")
async def test_an_admin_counts_every_account_or_the_one_it_names(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    keys = f"{KEY_ACME}:acme,{KEY_BETA}:beta,key-ops-0123:ops"
    admin = {"Authorization": "Bearer key-ops-0123"}
    limited = _limited(settings, api_keys=keys, api_admin_keys="key-ops-0123")
    async with make_api_client(limited) as client:
        everyone = await client.get(STATUS, headers=admin)
        named = await client.get(STATUS, params={"account": "beta"}, headers=admin)
        refused = await client.get(
            STATUS, params={"account": "beta"}, headers={"Authorization": f"Bearer {KEY_ACME}"}
        )
        empty = await client.get(STATUS, params={"account": ""}, headers=admin)
        acme = await _status(client, KEY_ACME)

    # Every account's tasks, as without API_KEYS; and beta's alone, as beta sees them.
    assert everyone.status_code == 200, everyone.text
    assert everyone.json()["account"] is None
    assert everyone.json()["totals"] == {"pending": 2, "inflight": 3, "dispatched_last_minute": 3}
    assert named.status_code == 200, named.text
    assert named.json()["account"] == "beta"
    assert _by_key(named.json()) == {
        "task:download": (0, 0, 1),
        "account:beta": (1, 1, 1),
        "host:a.example": (0, 0, 1),
        "host:slow.example": (0, 0, 0),
    }
    assert refused.status_code == 403, refused.text
    assert empty.status_code == 422, empty.text
    assert empty.json()["detail"][0]["loc"] == ["query", "account"]
    # An ordinary key still sees only its own account.
    assert acme["account"] == "acme"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY_ACME}],
    ids=["none", "wrong", "no-scheme"],
)
async def test_without_a_valid_key_is_401(
    keyed_client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await keyed_client.get(STATUS, headers=headers)

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_without_rules_only_totals(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    now = utcnow()
    await add_task(sessions, Row(account="a", name="greeting", stage=Stage.PENDING), now=now)
    await add_task(
        sessions, Row(account="a", name="greeting", stage=Stage.QUEUED, queued_ago_s=61), now=now
    )

    body = await _status(api_client)

    assert body["cluster"] is None
    assert body["keys"] == []
    assert body["totals"] == {"pending": 1, "inflight": 1, "dispatched_last_minute": 0}
    assert datetime.fromisoformat(body["as_of"]) >= now


async def test_empty_database_lists_specific_rules_with_zeros(
    limited_client: httpx.AsyncClient,
) -> None:
    body = await _status(limited_client)

    assert body["totals"] == {"pending": 0, "inflight": 0, "dispatched_last_minute": 0}
    assert _numbers(body["cluster"]) == (0, 0, 0)
    assert _by_key(body) == {
        "task:download": (0, 0, 0),
        "account:acme": (0, 0, 0),
        "host:slow.example": (0, 0, 0),
    }


async def test_cluster_rule_from_relay_limits_merges_with_the_shorthand(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    merged = Settings(
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        relay_limits="cluster rate=2/s burst=8 inflight=4",
        relay_max_inflight=6,
    )
    async with make_api_client(merged) as client:
        body = await _status(client)

    assert body["cluster"]["rule"] == "cluster rate=2/s burst=8 inflight=4 + RELAY_MAX_INFLIGHT=6"
    assert body["cluster"]["limit"] == {"rate_per_s": 2.0, "burst": 8, "inflight": 4}


async def test_response_model_is_in_openapi(api_client: httpx.AsyncClient) -> None:
    schema = (await api_client.get("/openapi.json")).json()
    operation = schema["paths"][STATUS]["get"]

    content = operation["responses"]["200"]["content"]["application/json"]
    assert content["schema"] == {"$ref": "#/components/schemas/RelayStatus"}
    assert {"401", "503"} <= set(operation["responses"])
    properties = schema["components"]["schemas"]["KeyStatus"]["properties"]
    assert {"key", "rule", "limit", "backlog", "inflight", "dispatched_last_minute"} <= set(
        properties
    )
