"""Limits as data over the API (GET, PUT, DELETE /limits/{scope}, pause, resume), on both
databases: admin keys only, strict bodies, scopes quoted in 422s, the environment's rules
shown with their source and overridable but not deletable, a limit_changes row per change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import select

from throttler.db import SessionFactory
from throttler.models import LimitChange
from throttler.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

LIMITS = "/api/v1/limits"
KEY_USER = "key-user-0123456789"
KEY_ADMIN = "key-admin-0123456789"
ENV_LIMITS = "task:greeting rate=2/s burst=3; host:* rate=1/s"
ADMIN = {"Authorization": f"Bearer {KEY_ADMIN}"}
USER = {"Authorization": f"Bearer {KEY_USER}"}


@pytest.fixture
async def client(
    settings: Settings, make_api_client: ApiClientFactory
) -> AsyncIterator[httpx.AsyncClient]:
    keyed = Settings(
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        relay_rate=100.0,
        relay_burst=10,
        relay_limits=ENV_LIMITS,
        api_keys=f"{KEY_USER}:acme,{KEY_ADMIN}:ops",
        api_admin_keys=KEY_ADMIN,
    )
    async with make_api_client(keyed) as client:
        yield client


async def _rules(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    answer = await client.get(LIMITS, headers=USER)
    assert answer.status_code == 200, answer.text
    return {rule["scope"]: rule for rule in answer.json()["rules"]}


async def _changes(sessions: SessionFactory) -> list[LimitChange]:
    async with sessions() as session:
        return list((await session.scalars(select(LimitChange).order_by(LimitChange.id))).all())


async def test_env_rules_are_listed_with_their_source(client: httpx.AsyncClient) -> None:
    rules = await _rules(client)
    assert rules["cluster"] == {
        "scope": "cluster",
        "rate": "100/s",
        "burst": 10,
        "inflight": None,
        "paused_until": None,
        "source": "env",
    }
    assert rules["task:greeting"]["rate"] == "2/s"
    assert rules["task:greeting"]["burst"] == 3
    assert rules["host:*"]["source"] == "env"


async def test_put_overrides_then_delete_restores_the_env_rule(
    client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    answer = await client.put(
        f"{LIMITS}/task:greeting", json={"rate": "300/m", "burst": 2, "inflight": 4}, headers=ADMIN
    )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "scope": "task:greeting",
        "rate": "5/s",
        "burst": 2,
        "inflight": 4,
        "paused_until": None,
        "source": "api",
    }
    assert (await _rules(client))["task:greeting"]["source"] == "api"

    deleted = await client.delete(f"{LIMITS}/task:greeting", headers=ADMIN)
    assert deleted.status_code == 204, deleted.text
    assert (await _rules(client))["task:greeting"] == {
        "scope": "task:greeting",
        "rate": "2/s",
        "burst": 3,
        "inflight": None,
        "paused_until": None,
        "source": "env",
    }
    changes = await _changes(sessions)
    assert [(c.scope, c.change, c.reason, c.by) for c in changes] == [
        ("task:greeting", "set", "api", "ops"),
        ("task:greeting", "delete", "api", "ops"),
    ]
    assert changes[0].before is None
    assert changes[0].after == {"rate_per_s": 5.0, "burst": 2, "inflight": 4, "paused_until": None}
    assert changes[1].before == changes[0].after
    assert changes[1].after is None


async def test_a_new_scope_percent_encoded_and_canonical(client: httpx.AsyncClient) -> None:
    answer = await client.put(f"{LIMITS}/host:%5B0:0::1%5D", json={"rate": "1/h"}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    assert answer.json()["scope"] == "host:[::1]"
    assert answer.json()["rate"] == "1/h"
    assert answer.json()["burst"] == 1
    each = await client.put(f"{LIMITS}/account:*", json={"inflight": 3}, headers=ADMIN)
    assert each.status_code == 200, each.text
    assert each.json()["rate"] is None
    assert (await _rules(client))["account:*"]["inflight"] == 3


async def test_deleting_an_env_rule_is_refused_with_why(
    client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    answer = await client.delete(f"{LIMITS}/task:greeting", headers=ADMIN)
    assert answer.status_code == 409
    assert "RELAY_LIMITS" in answer.json()["detail"]
    assert "overridden" in answer.json()["detail"]
    cluster = await client.delete(f"{LIMITS}/cluster", headers=ADMIN)
    assert cluster.status_code == 409
    missing = await client.delete(f"{LIMITS}/task:download", headers=ADMIN)
    assert missing.status_code == 404
    assert await _changes(sessions) == []


async def test_changes_need_an_admin_key(client: httpx.AsyncClient) -> None:
    calls = [
        ("PUT", f"{LIMITS}/cluster", {"rate": "5/s"}),
        ("DELETE", f"{LIMITS}/cluster", None),
        ("POST", f"{LIMITS}/cluster/pause", {"for_s": 5}),
        ("POST", f"{LIMITS}/cluster/resume", None),
    ]
    for method, url, body in calls:
        answer = await client.request(method, url, json=body, headers=USER)
        assert answer.status_code == 403, (method, url, answer.text)
        anonymous = await client.request(method, url, json=body)
        assert anonymous.status_code == 401, (method, url, anonymous.text)
    assert (await _rules(client))["cluster"]["source"] == "env"


@pytest.mark.parametrize(
    ("body", "field", "quoted"),
    [
        ({"rate": "0/s"}, "rate", "0/s"),
        ({"rate": "5/d"}, "rate", "5/d"),
        ({"rate": 5}, "rate", None),
        ({"rate": "5/s", "burst": -1}, "burst", None),
        ({"rate": "5/s", "burst": 0}, "burst", None),
        ({"rate": "5/s", "burst": "2"}, "burst", None),
        ({"inflight": 0}, "inflight", None),
        ({"burst": 3}, None, "burst needs a rate"),
        ({}, None, "rate or inflight"),
        ({"rate": "5/s", "bogus": 1}, "bogus", None),
    ],
)
async def test_bad_rules_are_422_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, Any], field: str | None, quoted: str | None
) -> None:
    answer = await client.put(f"{LIMITS}/cluster", json=body, headers=ADMIN)
    assert answer.status_code == 422, answer.text
    errors = answer.json()["detail"]
    if field is not None:
        assert any(error["loc"][-1] == field for error in errors), errors
    if quoted is not None:
        assert any(quoted in error["msg"] for error in errors), errors


@pytest.mark.parametrize(
    "scope", ["task:nosuchtask", "planet:mars", "host:::1", "cluster:x", "task:", "host:a b"]
)
async def test_bad_scopes_are_422_quoting_them(client: httpx.AsyncClient, scope: str) -> None:
    for method, url, body in [
        ("PUT", f"{LIMITS}/{scope}", {"rate": "5/s"}),
        ("POST", f"{LIMITS}/{scope}/pause", {"for_s": 5}),
        ("DELETE", f"{LIMITS}/{scope}", None),
    ]:
        answer = await client.request(method, url, json=body, headers=ADMIN)
        assert answer.status_code == 422, (method, scope, answer.text)
        [error] = answer.json()["detail"]
        assert error["loc"] == ["path", "scope"]
        assert repr(scope) in error["msg"], error


async def test_pause_and_resume_an_env_scope_keep_its_rule(
    client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    before = datetime.now(UTC)
    answer = await client.post(f"{LIMITS}/task:greeting/pause", json={"for_s": 60}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    paused = answer.json()
    assert paused["source"] == "env"
    assert paused["rate"] == "2/s"
    until = datetime.fromisoformat(paused["paused_until"])
    assert before + timedelta(seconds=59) < until < before + timedelta(seconds=62)
    # An env rule that is only paused is still not deletable.
    assert (await client.delete(f"{LIMITS}/task:greeting", headers=ADMIN)).status_code == 409

    resumed = await client.post(f"{LIMITS}/task:greeting/resume", headers=ADMIN)
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["paused_until"] is None
    assert resumed.json()["rate"] == "2/s"
    changes = await _changes(sessions)
    assert [c.change for c in changes] == ["pause", "resume"]
    assert changes[0].after is not None
    assert changes[0].after["paused_until"] is not None
    assert changes[1].after is None


async def test_a_pause_survives_put_and_delete_of_the_rule(client: httpx.AsyncClient) -> None:
    until = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    paused = await client.post(f"{LIMITS}/account:acme/pause", json={"until": until}, headers=ADMIN)
    assert paused.status_code == 200, paused.text
    assert paused.json()["rate"] is None
    assert paused.json()["source"] == "api"
    put = await client.put(f"{LIMITS}/account:acme", json={"rate": "1/s"}, headers=ADMIN)
    assert put.json()["paused_until"] == paused.json()["paused_until"]
    assert (await client.delete(f"{LIMITS}/account:acme", headers=ADMIN)).status_code == 204
    rules = await _rules(client)
    assert rules["account:acme"]["paused_until"] == paused.json()["paused_until"]
    assert rules["account:acme"]["rate"] is None


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"for_s": 0},
        {"for_s": -5},
        {"for_s": "5"},
        {"for_s": True},
        {"until": "2020-01-01T00:00:00Z"},
        {"until": "2099-01-01T00:00:00"},
        {"until": "2099-01-01T00:00:00Z", "for_s": 5},
        {"for_s": 5, "why": "x"},
    ],
)
async def test_bad_pauses_are_422(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    answer = await client.post(f"{LIMITS}/cluster/pause", json=body, headers=ADMIN)
    assert answer.status_code == 422, answer.text


async def test_an_ordinary_key_sees_no_other_accounts_rule(client: httpx.AsyncClient) -> None:
    for account in ("acme", "rival"):
        answer = await client.put(
            f"{LIMITS}/account:{account}", json={"inflight": 2}, headers=ADMIN
        )
        assert answer.status_code == 200
    assert "account:acme" in await _rules(client)
    assert "account:rival" not in await _rules(client)
    admin = await client.get(LIMITS, headers=ADMIN)
    assert {"account:acme", "account:rival"} <= {r["scope"] for r in admin.json()["rules"]}


async def test_relay_status_shows_the_rules_in_force(client: httpx.AsyncClient) -> None:
    answer = await client.put(f"{LIMITS}/cluster", json={"rate": "7/s"}, headers=ADMIN)
    assert answer.status_code == 200
    status = await client.get("/api/v1/relay/status", headers=ADMIN)
    assert status.json()["cluster"]["limit"]["rate_per_s"] == 7.0
    assert status.json()["cluster"]["rule"] == "cluster rate=7/s burst=1"


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/task:greeting"), ("POST", "/task:greeting/pause")],
)
@pytest.mark.parametrize(
    "body", [b'{"rate": ', b'{"rate": "5/s", "rate": "6/s"}', b"\xff\xfe", b'{"for_s": NaN}']
)
async def test_malformed_bodies_are_422_and_change_nothing(
    client: httpx.AsyncClient, sessions: SessionFactory, method: str, path: str, body: bytes
) -> None:
    answer = await client.request(
        method,
        LIMITS + path,
        content=body,
        headers={**ADMIN, "content-type": "application/json"},
    )

    assert answer.status_code == 422, answer.text
    assert await _changes(sessions) == []
