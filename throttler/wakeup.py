"""Wake idle relays when new work is committed to the outbox.

Best effort by design, like ``throttler.finished``: the relay still polls the outbox
every ``RELAY_POLL_INTERVAL_S``, so a lost announcement (Redis away, no relay
subscribed yet) costs at most one poll interval, never a task.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from throttler.constants import SUBMITTED_CHANNEL
from throttler.logs import fields

log = logging.getLogger(__name__)

# A dead Redis must never hold up intake: the announcement is dropped after this.
ANNOUNCE_TIMEOUT_S = 0.5


async def announce_new_work(redis: Redis, *, timeout_s: float = ANNOUNCE_TIMEOUT_S) -> None:
    """Publish one message on ``SUBMITTED_CHANNEL``; call only after the outbox commit.

    Never raises for a Redis failure: intake does not depend on Redis.
    """
    try:
        async with asyncio.timeout(timeout_s):
            await redis.publish(SUBMITTED_CHANNEL, b"1")
    except (RedisError, OSError, TimeoutError) as error:
        log.debug("outbox.new_work_not_announced", extra=fields(error=repr(error)))
