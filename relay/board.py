"""Publish why pending tasks wait: the relay's own verdicts, as a board in Redis.

After each claim the relay hands ``BoardPublisher.offer`` what it just decided with
(``board_from``): the keys it left out for want of tokens, each with the moment its next
token falls due on the limiter's clock (the real moment, not the relay's early re-ask),
the keys at their in-flight cap once this claim's leases count, and whether ARQ's queue
has room. The API reads the boards of the live relays (throttler.waiting).

A write never slows a claim: it runs in a task of its own, at most every
``MIN_WRITE_INTERVAL_S`` when the verdicts change and every ``REFRESH_EVERY_S`` when they
do not, and a Redis error there is logged at DEBUG and forgotten (the next claim offers
again). The key lives until a while after the relay's next planned step, so a relay
that sleeps for its cluster bucket (a minute at 1/m) keeps its board; a dead relay's
board is ignored at once anyway, since readers ask only the live relays' (throttler.nodes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime

from redis.asyncio import Redis

from throttler.errors import REDIS_ERRORS
from throttler.limits import LimitKey
from throttler.logs import fields
from throttler.throttle import Admission, Candidate, InflightCaps
from throttler.waiting import WaitingBoard, board_key

log = logging.getLogger("relay")

# A changed board is written at most this often (a busy relay claims many times a second).
MIN_WRITE_INTERVAL_S = 0.25
# An unchanged board is written again this often: ``written_at`` shows the relay looked.
REFRESH_EVERY_S = 1.0
# How long a board outlives the relay's next planned step: Redis then drops a board its
# relay stopped writing (a dead relay's is ignored sooner, by its heartbeat).
KEEP_AFTER_STEP_S = 5.0
# A clean stop waits at most this long to delete the board.
DELETE_TIMEOUT_S = 1.0


def next_tokens(admission: Admission) -> dict[LimitKey, datetime]:
    """When each key that refused a candidate holds a token again (UTC, the limiter's clock)."""
    granted_s = admission.granted_at_s
    return {
        key: datetime.fromtimestamp(granted_s + wait_s, UTC)
        for key, wait_s in admission.blocked.items()
    }


def board_from(
    *,
    relay_id: str,
    written_at: datetime,
    blocked: Iterable[LimitKey],
    next_token: Mapping[LimitKey, datetime],
    caps: InflightCaps,
    inflight: Mapping[LimitKey, int],
    occupying: Collection[Candidate],
    room: int | None,
) -> WaitingBoard:
    """What a claim decided with, as a board.

    ``blocked``: the keys the relay leaves out for want of tokens (its memory);
    ``next_token``: when each holds a token again. ``inflight``: the counts the claim
    read; ``occupying``: the candidates it leased that take a slot now (not re-claimed
    queued tasks, counted already). ``room``: the queue room it read (None: no cap).
    """
    occupied: Counter[LimitKey] = Counter(inflight)
    if caps:
        for candidate in occupying:
            occupied.update(caps.keys(candidate))
    return WaitingBoard(
        relay_id=relay_id,
        written_at=written_at,
        rate={key: next_token[key] for key in blocked if key in next_token},
        inflight=frozenset(caps.full(occupied)),
        queue_full=room is not None and room - len(occupying) <= 0,
    )


class BoardPublisher:
    """Write one relay's board to Redis in the background, never failing its caller."""

    def __init__(
        self, *, redis: Redis, relay_id: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.redis = redis
        self.key = board_key(relay_id)
        self.clock = clock
        self._offered: tuple[WaitingBoard, float] | None = None
        self._written: WaitingBoard | None = None
        self._written_at = -float("inf")
        self._task: asyncio.Task[None] | None = None

    def offer(self, board: WaitingBoard, *, keep_s: float) -> None:
        """Publish ``board`` soon, keeping it at least ``keep_s`` (the relay's next step)."""
        self._offered = (board, max(0.0, keep_s))
        if (self._task is None or self._task.done()) and self._wait_s() is not None:
            self._task = asyncio.create_task(self._publish())

    def _wait_s(self) -> float | None:
        """How long to wait before writing the offered board; None: not now.

        A change waits out the least interval between writes; an unchanged board is
        written only once a refresh is due (the next offer asks again).
        """
        if self._offered is None or self._offered[0] is self._written:
            return None
        board, _ = self._offered
        since_s = self.clock() - self._written_at
        if board.same_verdicts(self._written):
            return 0.0 if since_s >= REFRESH_EVERY_S else None
        return max(0.0, MIN_WRITE_INTERVAL_S - since_s)

    async def _publish(self) -> None:
        """Write the latest offer when due, until what is written is the latest."""
        while (wait_s := self._wait_s()) is not None:
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            assert self._offered is not None
            board, keep_s = self._offered
            # Tried or not, this counts as a write: a failing Redis is asked at this pace.
            self._written_at = self.clock()
            try:
                ttl_ms = round((keep_s + KEEP_AFTER_STEP_S) * 1000)
                await self.redis.set(self.key, board.encode(), px=ttl_ms)
            except REDIS_ERRORS as error:
                # Only the report suffers; the next claim offers a board again.
                log.debug("relay.board_failed", extra=fields(key=self.key, error=repr(error)))
                return
            self._written = board

    async def close(self) -> None:
        """Stop writing and delete the board: a relay that stops cleanly says nothing."""
        if self._task is not None:
            self._task.cancel()
            # wait(), not await: only the writer's cancellation, never our caller's, is quiet.
            await asyncio.wait([self._task])
        try:
            async with asyncio.timeout(DELETE_TIMEOUT_S):
                await self.redis.delete(self.key)
        except REDIS_ERRORS as error:
            log.debug("relay.board_failed", extra=fields(key=self.key, error=repr(error)))
