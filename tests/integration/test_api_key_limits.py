"""``key:`` limits as the API shows them: /relay/status per label, and why a task waits.

Both dialects; ``why_waiting`` against a real relay in process (with its heartbeat), as
in test_api_waiting.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from tests.integration.test_api_waiting import _submit, _until_view, _view, running_relay
from tests.support import record_success, start_attempt, submit_task
from throttler.db import SessionFactory
from throttler.models import utcnow
from throttler.settings import Settings
from throttler.store.outbox import CoreClaim

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

STATUS = "/api/v1/relay/status"


async def _task(
    sessions: SessionFactory,
    *,
    account: str,
    labels: tuple[str, ...],
    stage: str,
    now: datetime,
    queued_ago_s: float = 0.0,
) -> None:
    queued_at = now - timedelta(seconds=queued_ago_s)
    async with sessions.begin() as session:
        task = await submit_task(
            session,
            name="greeting",
            account=account,
            payload={"name": "x"},
            now=queued_at - timedelta(seconds=1),
            labels=labels,
        )
        if stage == "pending":
            return
        await CoreClaim(session).mark_queued(task_ids=[task.id], relay_id="r", now=queued_at)
        if stage in ("running", "succeeded"):
            assert await start_attempt(session, task_id=task.id, worker_id="w", now=queued_at)
        if stage == "succeeded":
            await record_success(
                session, task_id=task.id, result={}, attempt=1, worker_id="w", now=queued_at
            )


async def test_relay_status_shows_each_label_under_its_rule(
    settings: Settings, sessions: SessionFactory, make_api_client: ApiClientFactory
) -> None:
    now = utcnow()
    for account, labels, stage, ago in [
        ("acme", ("connector:sf",), "pending", 0.0),
        ("acme", ("connector:sf",), "queued", 5.0),
        ("acme", ("connector:hub", "tenant:acme"), "running", 5.0),
        ("beta", ("tenant:acme",), "succeeded", 10.0),
        ("beta", ("connector:sf_eu",), "pending", 0.0),
        ("beta", ("a_b:y",), "queued", 5.0),
        # Not a_b's: "_" is a LIKE wildcard, escaped in the count's filter.
        ("beta", ("axb:x",), "pending", 0.0),
        ("beta", (), "pending", 0.0),
    ]:
        await _task(
            sessions, account=account, labels=labels, stage=stage, now=now, queued_ago_s=ago
        )
    limits = (
        "key:connector:* inflight=2; key:connector:sf_eu inflight=1; "
        "key:tenant:acme rate=5/s; key:a_b:* inflight=3; key:tenant:none inflight=1"
    )
    configured = Settings(**{**settings.model_dump(), "relay_limits": limits})
    async with make_api_client(configured) as client:
        response = await client.get(STATUS)
    assert response.status_code == 200, response.text
    keys = response.json()["keys"]
    numbers = {
        e["key"]: (e["rule"], e["backlog"], e["inflight"], e["dispatched_last_minute"])
        for e in keys
    }
    assert numbers == {
        "key:a_b:y": ("key:a_b:* inflight=3", 0, 1, 1),
        "key:connector:hub": ("key:connector:* inflight=2", 0, 1, 1),
        "key:connector:sf": ("key:connector:* inflight=2", 1, 1, 1),
        # The specific rule over the wildcard; specific rules are listed even when idle.
        "key:connector:sf_eu": ("key:connector:sf_eu inflight=1", 1, 0, 0),
        "key:tenant:acme": ("key:tenant:acme rate=5/s", 0, 1, 2),
        "key:tenant:none": ("key:tenant:none inflight=1", 0, 0, 0),
    }
    assert [e["key"] for e in keys] == sorted(numbers)
    limit = next(e["limit"] for e in keys if e["key"] == "key:tenant:acme")
    assert limit == {"rate_per_s": 5.0, "burst": 1, "inflight": None}


def _configured(settings: Settings, **overrides: Any) -> Settings:
    return Settings(**{**settings.model_dump(), **overrides})


async def test_a_task_waiting_for_a_label_names_its_key_scope(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    configured = _configured(
        settings, relay_limits="key:connector:* inflight=1; key:tenant:acme rate=1/m burst=1"
    )
    async with make_api_client(configured) as client, running_relay(configured):
        first = await _submit(client, "greeting", {"name": "a"}, key="connector:sf")
        # Handed to ARQ (no worker runs here): it holds connector:sf's one slot.
        await _until_view(client, first, status="queued", message="the first sf task queued")
        second = await _submit(client, "greeting", {"name": "b"}, key="connector:sf")
        view = await _until_view(client, second, waiting="inflight", message="sf's cap held")
        assert view["waiting"] == {"reason": "inflight", "scope": "key:connector:sf", "until": None}
        # Another connector is not held back by it.
        other = await _submit(client, "greeting", {"name": "c"}, key="connector:hub")
        await _until_view(client, other, status="queued", message="a hub task queued")

        acme = [
            await _submit(client, "greeting", {"name": f"t{i}"}, key=["tenant:acme", f"n:{i}"])
            for i in range(2)
        ]
        await _until_view(client, acme[0], status="queued", message="acme's first task queued")
        view = await _until_view(client, acme[1], waiting="rate", message="acme's next token")
        assert view["waiting"]["scope"] == "key:tenant:acme"
        assert (await _view(client, second))["status"] == "pending"
