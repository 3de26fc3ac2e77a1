"""A host: limit holds however the URL spells the address: submitted through the API,
released by a relay on real Redis buckets."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy import select

from tests.integration.test_relay_flow import make_relay, queued_order
from throttler.db import SessionFactory
from throttler.models import Task
from throttler.settings import Settings

# Six spellings of 127.0.0.1 that the resolver (and the worker's guard) all connect to.
LOOPBACK_V4 = [
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
]
LOOPBACK_V6 = ["[::1]", "[0:0::1]", "[0000:0000::0001]"]


@pytest.fixture
async def arq(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    yield pool
    await pool.aclose()


@pytest.mark.parametrize(
    ("rule", "spellings", "key"),
    [
        ("host:127.0.0.1 rate=1/m", LOOPBACK_V4, "127.0.0.1"),
        ("host:0x7f.1 rate=1/m", LOOPBACK_V4, "127.0.0.1"),
        ("host:[::1] rate=1/m", LOOPBACK_V6, "[::1]"),
        ("host:* rate=1/m", LOOPBACK_V4, "127.0.0.1"),
    ],
    ids=["ipv4-rule", "ipv4-rule-spelled-oddly", "ipv6-rule", "each-host"],
)
async def test_every_spelling_of_an_address_draws_one_bucket(
    api_client: httpx.AsyncClient,
    settings: Settings,
    sessions: SessionFactory,
    arq: ArqRedis,
    rule: str,
    spellings: list[str],
    key: str,
) -> None:
    for spelling in spellings:
        answer = await api_client.post(
            "/api/v1/task/download", json={"url": f"http://{spelling}:8080/file"}
        )
        assert answer.status_code == 202, answer.text
    async with sessions() as session:
        hosts = set((await session.execute(select(Task.host))).scalars())
    assert hosts == {key}

    relay, _ = make_relay(settings, sessions, arq, relay_limits=rule)
    for _ in range(3):
        await relay.step()
    await relay.flush()

    # One token a minute: the first download goes, every other spelling waits its turn.
    assert len(await queued_order(sessions)) == 1
