"""A Redis that accepts connections but never answers does not hold our loops.

The relay's and the worker's ARQ pool (``connect_arq``) and the plain clients
(``redis_client``) give each command REDIS_TIMEOUT_S to be answered: a network cut that
drops packets, or a stalled server, surfaces as Redis's TimeoutError, which every loop
retries (throttler.errors), instead of a wait until TCP gives up (hours).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from throttler.errors import REDIS_ERRORS
from throttler.redis_conn import connect_arq, redis_client
from throttler.settings import Settings

TIMEOUT_S = 0.5


@contextmanager
def silent_server() -> Iterator[str]:
    """A TCP listener that accepts every connection and never sends a byte: its URL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        listener.close()


def _settings(url: str) -> Settings:
    return Settings(redis_url=url, redis_timeout_s=TIMEOUT_S)


async def test_the_arq_pool_gives_up_on_a_redis_that_never_answers() -> None:
    with silent_server() as url:
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError) as raised:
            await asyncio.wait_for(connect_arq(_settings(url)), timeout=10 * TIMEOUT_S)
        assert time.monotonic() - started < 5 * TIMEOUT_S
    # Every loop retries it as Redis being away.
    assert isinstance(raised.value, REDIS_ERRORS)


async def test_a_plain_client_waits_redis_timeout_s_by_default() -> None:
    with silent_server() as url:
        client = redis_client(_settings(url))
        try:
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await asyncio.wait_for(client.get("key"), timeout=10 * TIMEOUT_S)
            assert time.monotonic() - started < 5 * TIMEOUT_S
        finally:
            await client.aclose()


async def test_the_arq_pool_still_works_against_a_real_redis(redis_url: str) -> None:
    pool = await connect_arq(Settings(redis_url=redis_url, redis_timeout_s=TIMEOUT_S))
    try:
        await pool.set("timeouts:probe", b"1")
        assert await pool.get("timeouts:probe") == b"1"
        assert pool.connection_pool.connection_kwargs["socket_timeout"] == TIMEOUT_S
    finally:
        await pool.aclose()
