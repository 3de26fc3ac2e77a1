"""The dispatch throttle: a token bucket behind a small admission protocol.

``take`` is the whole algorithm, pure and clock-free, so its properties are checked with
a fake clock in microseconds. ``MemoryTokenBucket`` runs it in process (unit tests);
``RedisTokenBucket`` runs the same arithmetic as one atomic Lua script on Redis, with
Redis ``TIME`` as the clock, so every relay on every host draws from one bucket.

Relays speak to a ``Limiter``: ``admit(candidates)`` answers which of them may be
dispatched now and when to ask again. Today only the cluster bucket (``RELAY_RATE``,
``RELAY_BURST``) stands behind it; per-key rules later judge each candidate by its
name or account in the same single call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis

from throttler.constants import RATE_BUCKET_KEY_PREFIX

CLUSTER_BUCKET_KEY = RATE_BUCKET_KEY_PREFIX + "cluster"
# Grant a token that float rounding left a hair short of whole, so that asking again
# after ``wait_s`` always succeeds; it lets a take run at most 1e-9 tokens early.
TOKEN_EPSILON = 1e-9

Clock = Callable[[], float]


@dataclass(frozen=True, kw_only=True, slots=True)
class BucketState:
    """Tokens left at ``updated_s``; a missing state is a full bucket."""

    tokens: float
    updated_s: float


def take(
    state: BucketState | None,
    *,
    now_s: float,
    want: int,
    rate_per_s: float,
    burst: int,
    horizon_s: float = 0.0,
) -> tuple[BucketState, int, float]:
    """Refill to ``now_s``, grant up to ``want`` whole tokens, say when the next is due.

    Returns the new state, the tokens granted and ``wait_s``: the time until the bucket
    holds a whole token again (0 if it still does). With ``horizon_s`` > 0 it also
    grants tokens that fall due within that time, leaving the bucket in debt: each is
    usable only from its own moment (``ready_in_s``), exactly when a caller asking right
    on time would have got it. The Lua script in ``_TAKE_LUA`` performs these exact
    operations in the same order.
    """
    if state is None:
        tokens = float(burst)
        updated_s = now_s
    else:
        # A clock that steps back (another host's view, an explicit test time) refills nothing.
        elapsed_s = max(0.0, now_s - state.updated_s)
        tokens = min(float(burst), state.tokens + elapsed_s * rate_per_s)
        updated_s = max(state.updated_s, now_s)
    granted = max(0, min(want, math.floor(tokens + horizon_s * rate_per_s + TOKEN_EPSILON)))
    tokens = tokens - granted
    wait_s = 0.0 if tokens + TOKEN_EPSILON >= 1.0 else (1.0 - tokens) / rate_per_s
    return BucketState(tokens=tokens, updated_s=updated_s), granted, wait_s


def ready_in_s(*, tokens_left: float, granted: int, rate_per_s: float) -> tuple[float, ...]:
    """Seconds from the grant until each granted token may be used (0 = at once)."""
    before = tokens_left + granted
    return tuple(
        max(0.0, (index + 1 - before - TOKEN_EPSILON) / rate_per_s) for index in range(granted)
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """A task asking to be dispatched, with what per-key rules will look at."""

    task_id: str
    name: str
    account: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Admission:
    """Which candidates may go now (in the order asked) and when to ask about the rest."""

    admitted: tuple[Candidate, ...]
    # Seconds until the limiter can admit more; 0 when it was not the limit.
    wait_s: float
    # For each admitted candidate, seconds from now until it may be dispatched.
    ready_in_s: tuple[float, ...]
    # POSIX time of the grant on the limiter's own clock, shared by every relay (Redis
    # TIME); None when the limiter has no such clock.
    granted_at_s: float | None = None


class Limiter(Protocol):
    """Decide which candidates may be dispatched, and when; admitted ones count as sent.

    ``horizon_s`` lets the limiter admit candidates whose turn comes within that time,
    each to be dispatched no earlier than its ``ready_in_s``.
    """

    async def admit(
        self, candidates: Sequence[Candidate], *, horizon_s: float = 0.0
    ) -> Admission: ...


def admit_all(candidates: Sequence[Candidate]) -> Admission:
    return Admission(admitted=tuple(candidates), wait_s=0.0, ready_in_s=(0.0,) * len(candidates))


def _admission(
    candidates: Sequence[Candidate],
    state: BucketState,
    granted: int,
    wait_s: float,
    rate: float,
    *,
    granted_at_s: float | None = None,
) -> Admission:
    return Admission(
        admitted=tuple(candidates[:granted]),
        wait_s=wait_s if granted < len(candidates) else 0.0,
        ready_in_s=ready_in_s(tokens_left=state.tokens, granted=granted, rate_per_s=rate),
        granted_at_s=granted_at_s,
    )


class UnlimitedLimiter:
    """Admit everything at once (``RELAY_RATE=0``)."""

    async def admit(self, candidates: Sequence[Candidate], *, horizon_s: float = 0.0) -> Admission:
        return admit_all(candidates)


class MemoryTokenBucket:
    """One token bucket in this process, on an injectable clock (tests, single relay)."""

    def __init__(self, *, rate_per_s: float, burst: int, clock: Clock = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock
        self.state: BucketState | None = None

    async def admit(self, candidates: Sequence[Candidate], *, horizon_s: float = 0.0) -> Admission:
        if self.rate_per_s == 0:
            return admit_all(candidates)
        self.state, granted, wait_s = take(
            self.state,
            now_s=self.clock(),
            want=len(candidates),
            rate_per_s=self.rate_per_s,
            burst=self.burst,
            horizon_s=horizon_s,
        )
        return _admission(candidates, self.state, granted, wait_s, self.rate_per_s)


# KEYS[1] bucket hash; ARGV: want, rate_per_s, burst, now_s ("" = Redis TIME), epsilon,
# horizon_s.
# Numbers are written with %.17g so that they round-trip exactly (Lua's tostring keeps
# only 14 digits) and returned as strings (Redis truncates Lua numbers to integers).
_TAKE_LUA = """
local want = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local now
if ARGV[4] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[4])
end
local eps = tonumber(ARGV[5])
local horizon = tonumber(ARGV[6])
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'updated_s')
local tokens, updated
if saved[1] and saved[2] then
  local elapsed = math.max(0.0, now - tonumber(saved[2]))
  tokens = math.min(burst, tonumber(saved[1]) + elapsed * rate)
  updated = math.max(tonumber(saved[2]), now)
else
  tokens = burst
  updated = now
end
local granted = math.max(0, math.min(want, math.floor(tokens + horizon * rate + eps)))
tokens = tokens - granted
local wait = 0.0
if tokens + eps < 1.0 then
  wait = (1.0 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'updated_s', string.format('%.17g', updated))
-- Once idle long enough to refill, a missing key means the same as a full bucket.
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {granted, string.format('%.17g', tokens), string.format('%.17g', updated),
  string.format('%.17g', wait)}
"""


class RedisTokenBucket:
    """The cluster token bucket in Redis, shared by every relay, on Redis's clock."""

    def __init__(
        self, *, redis: Redis, rate_per_s: float, burst: int, key: str = CLUSTER_BUCKET_KEY
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.key = key
        self._script = redis.register_script(_TAKE_LUA)

    async def take(
        self, *, want: int, now_s: float | None = None, horizon_s: float = 0.0
    ) -> tuple[BucketState, int, float]:
        """Run ``take`` atomically in Redis; ``now_s`` replaces Redis TIME (tests only)."""
        reply = await self._script(
            keys=[self.key],
            args=[
                want,
                repr(self.rate_per_s),
                self.burst,
                "" if now_s is None else repr(now_s),
                repr(TOKEN_EPSILON),
                repr(float(horizon_s)),
            ],
        )
        granted, tokens, updated_s, wait_s = reply
        state = BucketState(tokens=float(tokens), updated_s=float(updated_s))
        return state, int(granted), float(wait_s)

    async def admit(self, candidates: Sequence[Candidate], *, horizon_s: float = 0.0) -> Admission:
        if self.rate_per_s == 0 or not candidates:
            return admit_all(candidates)
        state, granted, wait_s = await self.take(want=len(candidates), horizon_s=horizon_s)
        return _admission(
            candidates, state, granted, wait_s, self.rate_per_s, granted_at_s=state.updated_s
        )


def build_limiter(*, redis: Redis, rate_per_s: float, burst: int) -> Limiter:
    """Return the cluster limiter for ``RELAY_RATE`` / ``RELAY_BURST`` (0 = unlimited)."""
    if rate_per_s == 0:
        return UnlimitedLimiter()
    return RedisTokenBucket(redis=redis, rate_per_s=rate_per_s, burst=burst)
