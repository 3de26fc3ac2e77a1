"""A Redis pub/sub subscription that outlives Redis outages.

The API's long-poll waiters and the relay's wake-ups both listen to a channel whose
messages are hints (the database stays the truth, and each has a fallback), so the
listener only has to come back: on an error it resubscribes with backoff, logging one
line when the subscription drops and one when it is back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from throttler.errors import REDIS_ERRORS
from throttler.retry import REDIS_RECONNECT, Outage, pause

# How long one wait for a message lasts; also how soon ``stop`` takes effect.
LISTEN_POLL_S = 0.5


class ChannelListener:
    """Call ``on_message(data)`` for every message on ``channels`` until stopped.

    ``event`` names the log lines (``<event>.unsubscribed``, ``<event>.resubscribed``),
    written to ``log``. Resubscribes follow ``REDIS_RECONNECT``; ``backoff_s`` and
    ``backoff_max_s`` shorten it (tests).
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
        backoff_s: float = REDIS_RECONNECT.first_s,
        backoff_max_s: float = REDIS_RECONNECT.max_s,
    ) -> None:
        self.redis = redis
        self.channels = tuple(channels)
        self.on_message = on_message
        self.event = event
        self.log = log
        self.poll_s = poll_s
        self.backoff = dataclasses.replace(REDIS_RECONNECT, first_s=backoff_s, max_s=backoff_max_s)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Make ``run`` return within ``poll_s``.

        Cancelling the task is quicker, but redis-py can swallow a cancellation that lands
        while it connects; this flag ends the loop anyway.
        """
        self._stopping.set()

    async def run(self) -> None:
        """Listen until stopped; one log line when the subscription drops, one when back."""
        outage = Outage(
            self.log, down_event=f"{self.event}.unsubscribed", up_event=f"{self.event}.resubscribed"
        )
        delays = self.backoff.delays()

        def on_subscribed() -> None:
            nonlocal delays
            delays = self.backoff.delays()
            outage.succeeded()

        while not self._stopping.is_set():
            try:
                await self._listen(on_subscribed=on_subscribed)
            except REDIS_ERRORS as error:
                delay_s = next(delays)
                outage.failed(error, retry_in_s=round(delay_s, 3))
                await pause(delay_s, unless=self._stopping)

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
