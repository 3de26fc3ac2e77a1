"""Publish why pending tasks wait: the relay's own verdicts, as a board in Redis.

After each claim the relay offers ``BoardPublisher`` a way to build a board of what that
claim decided with (``board_from``): the keys it leaves out for want of tokens, each with
the moment its next token falls due on the limiter's clock (the real moment, not the
relay's early re-ask), the keys at their in-flight cap once the claim's own leases count,
and whether ARQ's queue has room. The API reads the live relays' boards
(throttler.waiting, api.waiting).

A board never slows a claim: it is built and written in a task of its own, from the
latest offer, at most every ``MIN_WRITE_INTERVAL_S``; written when its verdicts changed,
else every ``REFRESH_EVERY_S``. A Redis error there is logged at DEBUG and forgotten (the
next claim offers again).

Every relay's board is a field of one hash (``WAITING_BOARDS_KEY``), so a reader gets
them all with the live relays in one round trip. A board says until when it holds
(``expires_at``: a while after the relay's next planned step, so a relay that sleeps for
its cluster bucket, a minute at 1/m, keeps its board); readers ignore boards past it, and
boards of relays that are not alive (throttler.nodes). A relay that stops cleanly removes
its field; every relay removes long-expired fields now and then (dead relays' boards).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from redis.asyncio import Redis

from throttler.constants import WAITING_BOARDS_KEY
from throttler.errors import REDIS_ERRORS
from throttler.limits import LimitKey
from throttler.logs import fields
from throttler.throttle import Admission, Candidate, InflightCaps
from throttler.waiting import WaitingBoard

log = logging.getLogger("relay")

# A changed board is written at most this often (a busy relay claims many times a second).
MIN_WRITE_INTERVAL_S = 0.25
# An unchanged board is written again this often: ``written_at`` shows the relay looked.
REFRESH_EVERY_S = 1.0
# How long a board outlives the relay's next planned step: readers then ignore a board its
# relay stopped writing (a dead relay's is ignored sooner, by its heartbeat).
KEEP_AFTER_STEP_S = 5.0
# How often a relay removes boards that expired at least ``PRUNE_AFTER_S`` ago.
PRUNE_EVERY_S = 60.0
PRUNE_AFTER_S = 60.0
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
    paused: Mapping[LimitKey, datetime] | None = None,
) -> WaitingBoard:
    """What a claim decided with, as a board.

    ``blocked``: the keys the relay leaves out for want of tokens (its memory);
    ``next_token``: when each holds a token again. ``inflight``: the counts the claim
    read; ``occupying``: the candidates it leased that take a slot now (not re-claimed
    queued tasks, counted already). ``room``: the queue room it read (None: no cap).
    ``paused``: the scopes paused, each until its pause ends.
    """
    occupied: Counter[LimitKey] = Counter(inflight)
    if caps:
        # The keys of each kind of task once (a claim leases many alike), times its count.
        shapes = Counter((c.name, c.account, c.host, c.labels) for c in occupying)
        for (name, account, host, labels), count in shapes.items():
            shape = Candidate(task_id="", name=name, account=account, host=host, labels=labels)
            for key in caps.keys(shape):
                occupied[key] += count
    return WaitingBoard(
        relay_id=relay_id,
        written_at=written_at,
        rate={key: next_token[key] for key in blocked if key in next_token},
        inflight=frozenset(caps.full(occupied)),
        queue_full=room is not None and room - len(occupying) <= 0,
        paused=dict(paused or {}),
    )


class BoardPublisher:
    """Write one relay's board to Redis in the background, never failing its caller.

    ``offer`` takes how to build the board, not the board: at most one is built per
    ``MIN_WRITE_INTERVAL_S``, from the latest offer, in a task of its own.
    """

    def __init__(
        self, *, redis: Redis, relay_id: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.redis = redis
        self.relay_id = relay_id
        self.clock = clock
        self._pruned_at = clock()
        self._offer: tuple[Callable[[], WaitingBoard], float] | None = None
        self._offers = 0
        self._looked_at = 0  # offers looked at so far
        self._checked_at = -math.inf
        self._written: WaitingBoard | None = None
        self._written_at = -math.inf
        self._expires_at = -math.inf
        self._task: asyncio.Task[None] | None = None

    def offer(self, build: Callable[[], WaitingBoard], *, keep_s: float) -> None:
        """Publish ``build()`` soon, kept at least ``keep_s`` (until the relay's next step)."""
        self._offer = (build, max(0.0, keep_s))
        self._offers += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._publish())

    async def _publish(self) -> None:
        """Look at the latest offer when due; write it if it says something new."""
        while self._looked_at < self._offers and self._offer is not None:
            wait_s = self._checked_at + MIN_WRITE_INTERVAL_S - self.clock()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            build, keep_s = self._offer
            self._looked_at = self._offers
            now = self._checked_at = self.clock()
            board = build()
            if not self._worth_writing(board, now=now, keep_s=keep_s):
                continue
            # Tried or not, this counts as a write: a failing Redis is asked at this pace.
            self._written_at = now
            keep_until = datetime.now(UTC) + timedelta(seconds=keep_s + KEEP_AFTER_STEP_S)
            try:
                published = replace(board, expires_at=keep_until).encode()
                # Pipelines throughout: redis-py types their results for the async client.
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hset(WAITING_BOARDS_KEY, mapping={self.relay_id: published})
                    await pipe.execute()
                if now - self._pruned_at >= PRUNE_EVERY_S:
                    self._pruned_at = now
                    await self._prune()
            except REDIS_ERRORS as error:
                # Only the report suffers; the next claim offers a board again.
                log.debug("relay.board_failed", extra=fields(error=repr(error)))
                return
            self._written = board
            self._expires_at = now + keep_s + KEEP_AFTER_STEP_S

    async def _prune(self) -> None:
        """Remove boards that expired long ago: relays that died (or stopped unheard)."""
        stale_before = datetime.now(UTC) - timedelta(seconds=PRUNE_AFTER_S)
        stale = []
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(WAITING_BOARDS_KEY)
            [boards] = await pipe.execute()
        for relay_id, raw in boards.items():
            try:
                expires_at = WaitingBoard.decode(raw).expires_at
            except ValueError:
                # Another version's: removed; its relay, if alive, writes it within a second.
                expires_at = None
            if expires_at is None or expires_at < stale_before:
                stale.append(relay_id)
        if stale:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hdel(WAITING_BOARDS_KEY, *stale)
                await pipe.execute()

    def _worth_writing(self, board: WaitingBoard, *, now: float, keep_s: float) -> bool:
        """A change, a refresh due, or a relay that plans to sleep past the board's expiry."""
        return (
            not board.same_verdicts(self._written)
            or now - self._written_at >= REFRESH_EVERY_S
            or now + keep_s > self._expires_at - KEEP_AFTER_STEP_S / 2
        )

    async def close(self) -> None:
        """Stop writing and delete the board: a relay that stops cleanly says nothing."""
        if self._task is not None:
            self._task.cancel()
            # wait(), not await: only the writer's cancellation, never our caller's, is quiet.
            await asyncio.wait([self._task])
        try:
            async with asyncio.timeout(DELETE_TIMEOUT_S):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hdel(WAITING_BOARDS_KEY, self.relay_id)
                    await pipe.execute()
        except REDIS_ERRORS as error:
            log.debug("relay.board_failed", extra=fields(error=repr(error)))
