"""After a commit the API announces new outbox work, so idle relays wake at once."""

from __future__ import annotations

import httpx
import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from api.announce import NewWorkAnnouncer
from tests.support import wait_for
from throttler.constants import SUBMITTED_CHANNEL

GREETING = "/api/v1/task/greeting"
BULK = "/api/v1/tasks"


async def _announced(listener: PubSub) -> bool:
    message = await listener.get_message(ignore_subscribe_messages=True, timeout=0.1)
    return message is not None and message["channel"] == SUBMITTED_CHANNEL.encode()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (GREETING, {"name": "Ada"}),
        (BULK, {"tasks": [{"name": "greeting", "input": {"name": "Ada"}}] * 3}),
        # Options go through FastAPI's own handling rather than the fast path.
        (f"{GREETING}?priority=7", {"name": "Ada"}),
    ],
    ids=["single", "bulk", "with-options"],
)
async def test_a_committed_submission_is_announced(
    api_client: httpx.AsyncClient, redis: Redis, path: str, body: object
) -> None:
    listener = redis.pubsub()
    await listener.subscribe(SUBMITTED_CHANNEL)
    try:
        response = await api_client.post(path, json=body)
        assert response.status_code == 202, response.text
        await wait_for(lambda: _announced(listener), message="the announcement")
    finally:
        await listener.aclose()  # type: ignore[no-untyped-call]


async def test_a_commit_after_an_announcement_went_out_gets_one_more(
    redis: Redis, redis_url: str
) -> None:
    listener = redis.pubsub()
    await listener.subscribe(SUBMITTED_CHANNEL)
    publisher = Redis.from_url(redis_url)
    # Spaced widely, so the second commit surely lands while the first is still "in flight".
    announcer = NewWorkAnnouncer(publisher, min_interval_s=0.5)
    try:
        announcer.committed()
        await wait_for(lambda: _announced(listener), message="the first announcement")
        announcer.committed()  # a relay woken by the first may have looked already
        announcer.committed()  # shares the second
        await announcer.close()
        await wait_for(lambda: _announced(listener), message="the second announcement")
    finally:
        await listener.aclose()  # type: ignore[no-untyped-call]
        await publisher.aclose()
