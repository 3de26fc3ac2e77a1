"""Wake idle relays when new work is committed to the outbox (or an in-flight slot frees).

Best effort by design, like ``throttler.finished``: the relay still polls the outbox
every ``RELAY_POLL_INTERVAL_S``, so a lost announcement (Redis away, no relay
subscribed yet) costs at most one poll interval, never a task.

``announce_new_work`` is the API's side; ``WakeupListener`` the relay's: it subscribes
to the channels and calls back on every message, resubscribing with backoff when Redis
goes away (the relay meanwhile polls).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from throttler.constants import SUBMITTED_CHANNEL
from throttler.errors import REDIS_ERRORS
from throttler.logs import fields
from throttler.pubsub import LISTEN_POLL_S, ChannelListener
from throttler.retry import REDIS_RECONNECT

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
    except REDIS_ERRORS as error:
        log.debug("outbox.new_work_not_announced", extra=fields(error=repr(error)))


class WakeupListener(ChannelListener):
    """Call ``on_message()`` for every message on ``channels`` until stopped."""

    def __init__(
        self,
        *,
        redis: Redis,
        channels: Sequence[str],
        on_message: Callable[[], None],
        poll_s: float = LISTEN_POLL_S,
        backoff_s: float = REDIS_RECONNECT.first_s,
        backoff_max_s: float = REDIS_RECONNECT.max_s,
    ) -> None:
        super().__init__(
            redis=redis,
            channels=channels,
            on_message=lambda _data: on_message(),
            event="wakeup",
            log=log,
            poll_s=poll_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
        )
