"""A claim asks the limiter while its transaction holds a connection; when Redis has lost
the drain floor the limiter asks the database for the last dispatch, and that read runs in
the claim's own transaction. A second connection opened there could wait behind PgBouncer
for a server connection that only claims hold, one with the claim lock and the others
waiting for it (tests/acceptance/test_pgbouncer.py). Here an engine of one connection
stands in for a pool with none left."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from relay.relay import Relay, last_dispatch_within_claims
from tests.support import submit_greetings
from throttler.constants import RATE_DRAIN_FLOOR_KEY
from throttler.db import SessionFactory
from throttler.dispatches import last_dispatch_from
from throttler.limits import RuleSet
from throttler.settings import Settings
from throttler.store.outbox import open_outbox
from throttler.store.recovery import open_recovery
from throttler.throttle import LastDispatch, build_limiter

# PostgreSQL only: SQLite's claim holds the write lock, and readers do not queue for it.
pytestmark = pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
RULES = "cluster rate=100/s burst=5"


@pytest.fixture
async def arq(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    yield pool
    await pool.aclose()


@pytest.fixture
async def one_connection(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(settings.database_url, pool_size=1, max_overflow=0, pool_timeout=2)
    yield engine
    await engine.dispose()


def _relay(
    settings: Settings, engine: AsyncEngine, arq: ArqRedis, last_dispatch: LastDispatch
) -> Relay:
    settings = Settings(**{**settings.model_dump(), "relay_limits": RULES})
    return Relay(
        settings=settings,
        outbox=open_outbox(settings=settings, engine=engine),
        arq=arq,
        limiter=build_limiter(redis=arq, rules=RuleSet.parse(RULES), last_dispatch=last_dispatch),
    )


async def test_a_claim_reads_the_last_dispatch_on_its_own_connection(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis, one_connection: AsyncEngine
) -> None:
    await submit_greetings(sessions, 5)
    outside = last_dispatch_from(open_recovery(settings, one_connection))
    relay = _relay(settings, one_connection, arq, last_dispatch_within_claims(outside))
    assert await arq.get(RATE_DRAIN_FLOOR_KEY) is None  # Redis is new: the floor is asked

    batch = await relay.claim()

    assert len(batch.to_enqueue) == 5
    assert await arq.get(RATE_DRAIN_FLOOR_KEY) is not None
    # Outside a claim (a retime) it reads on a connection of its own, here the free one:
    # the moments the claim leased at.
    latest = await last_dispatch_within_claims(outside)()
    assert latest is not None
    assert latest == max(at.timestamp() for at in batch.run_at)


async def test_on_a_second_connection_the_claim_waits_for_one_it_holds(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis, one_connection: AsyncEngine
) -> None:
    await submit_greetings(sessions, 5)
    relay = _relay(
        settings, one_connection, arq, last_dispatch_from(open_recovery(settings, one_connection))
    )
    with pytest.raises(PoolTimeout):
        await relay.claim()
