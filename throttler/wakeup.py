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
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

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


# How long one wait for a message lasts; also how soon ``stop`` takes effect.
LISTEN_POLL_S = 0.5
RESUBSCRIBE_BACKOFF_S = 0.1
RESUBSCRIBE_BACKOFF_MAX_S = 5.0


class WakeupListener:
    """Call ``on_message`` for every message on ``channels`` until stopped."""

    def __init__(
        self,
        *,
        redis: Redis,
        channels: Sequence[str],
        on_message: Callable[[], None],
        poll_s: float = LISTEN_POLL_S,
        backoff_s: float = RESUBSCRIBE_BACKOFF_S,
        backoff_max_s: float = RESUBSCRIBE_BACKOFF_MAX_S,
    ) -> None:
        self.redis = redis
        self.channels = tuple(channels)
        self.on_message = on_message
        self.poll_s = poll_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Make ``run`` return within ``poll_s`` (a flag: redis-py may swallow a cancel)."""
        self._stopping.set()

    async def run(self) -> None:
        """Listen until stopped; one log line when the subscription drops, one when back."""
        delay_s = self.backoff_s
        down_since: float | None = None

        def on_subscribed() -> None:
            nonlocal delay_s, down_since
            delay_s = self.backoff_s
            if down_since is not None:
                outage_s = round(time.monotonic() - down_since, 3)
                log.info("wakeup.resubscribed", extra=fields(outage_s=outage_s))
                down_since = None

        while not self._stopping.is_set():
            try:
                await self._listen(on_subscribed=on_subscribed)
            except (RedisError, OSError, TimeoutError) as error:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning(
                        "wakeup.unsubscribed",
                        extra=fields(retry_max_s=self.backoff_max_s, error=repr(error)),
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay_s)
            delay_s = min(delay_s * 2, self.backoff_max_s)

    async def _listen(self, *, on_subscribed: Callable[[], None]) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(*self.channels)
            on_subscribed()
            while not self._stopping.is_set():
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=self.poll_s
                )
                if message is not None and message.get("type") == "message":
                    self.on_message()
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
