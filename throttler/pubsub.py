"""A Redis pub/sub subscription that outlives Redis outages.

The API's long-poll waiters and the relay's wake-ups both listen to a channel whose
messages are hints (the database stays the truth, and each has a fallback), so the
listener only has to come back: on an error it resubscribes with backoff, logging one
line when the subscription drops and one when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from redis.asyncio import Redis
from redis.exceptions import RedisError

from throttler.logs import fields

# How long one wait for a message lasts; also how soon ``stop`` takes effect.
LISTEN_POLL_S = 0.5
# Pause before resubscribing after Redis went away; doubles up to the cap.
RESUBSCRIBE_BACKOFF_S = 0.1
RESUBSCRIBE_BACKOFF_MAX_S = 5.0
REDIS_DOWN_ERRORS = (RedisError, OSError, TimeoutError)


class ChannelListener:
    """Call ``on_message(data)`` for every message on ``channels`` until stopped.

    ``event`` names the log lines (``<event>.unsubscribed``, ``<event>.resubscribed``),
    written to ``log``.
    """

    def __init__(
        self,
        *,
        redis: Redis,
        channels: Sequence[str],
        on_message: Callable[[bytes], None],
        event: str,
        log: logging.Logger,
        poll_s: float = LISTEN_POLL_S,
        backoff_s: float = RESUBSCRIBE_BACKOFF_S,
        backoff_max_s: float = RESUBSCRIBE_BACKOFF_MAX_S,
    ) -> None:
        self.redis = redis
        self.channels = tuple(channels)
        self.on_message = on_message
        self.event = event
        self.log = log
        self.poll_s = poll_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Make ``run`` return within ``poll_s``.

        Cancelling the task is quicker, but redis-py can swallow a cancellation that lands
        while it connects; this flag ends the loop anyway.
        """
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
                self.log.info(f"{self.event}.resubscribed", extra=fields(outage_s=outage_s))
                down_since = None

        while not self._stopping.is_set():
            try:
                await self._listen(on_subscribed=on_subscribed)
            except REDIS_DOWN_ERRORS as error:
                if down_since is None:
                    down_since = time.monotonic()
                    self.log.warning(
                        f"{self.event}.unsubscribed",
                        extra=fields(retry_max_s=self.backoff_max_s, error=repr(error)),
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay_s)
            delay_s = min(delay_s * 2, self.backoff_max_s)

    async def _listen(self, *, on_subscribed: Callable[[], None]) -> None:
        """Subscribe, then hand over each message until an error or ``stop``."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(*self.channels)
            on_subscribed()
            while not self._stopping.is_set():
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=self.poll_s
                )
                if message is not None and message.get("type") == "message":
                    data = message["data"]
                    self.on_message(data if isinstance(data, bytes) else str(data).encode())
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped in redis-py
