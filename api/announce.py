"""Tell idle relays about committed submissions, never holding up the 202s."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from throttler.wakeup import announce_new_work

# Under load a batch commits every millisecond or two, and a relay that is awake is
# draining the backlog anyway: announcements are spaced at least this far apart (a
# publish costs the event loop about as much as a request). The last one is never
# dropped, so no commit waits longer than this for its announcement.
MIN_INTERVAL_S = 0.01


class NewWorkAnnouncer:
    """Publish on ``SUBMITTED_CHANNEL`` after commits: one message in flight at most.

    Commits that land while a message is in flight (or within ``min_interval_s`` of it)
    share one more message, sent after it: a relay woken by the earlier one may have
    looked before they committed.
    """

    def __init__(self, redis: Redis, *, min_interval_s: float = MIN_INTERVAL_S) -> None:
        self._redis = redis
        self._min_interval_s = min_interval_s
        self._sending: asyncio.Task[None] | None = None
        self._again = False

    def committed(self) -> None:
        """Note a commit; the message goes out from a background task."""
        if self._sending is not None:
            self._again = True
            return
        self._sending = asyncio.create_task(self._send(), name="announce-new-work")

    async def _send(self) -> None:
        try:
            while True:
                self._again = False
                await announce_new_work(self._redis)  # never raises
                await asyncio.sleep(self._min_interval_s)
                if not self._again:
                    return
        finally:
            self._sending = None

    async def close(self) -> None:
        """Wait for the message in flight, if any (it gives up after a short timeout)."""
        if self._sending is not None:
            await self._sending
