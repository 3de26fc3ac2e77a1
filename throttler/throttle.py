"""The dispatch throttle: one token bucket per limited key, behind a small admission protocol.

``decide`` is the whole algorithm, pure and clock-free, so its properties are checked with
a fake clock in microseconds. ``RedisLimiter`` runs the same arithmetic as one atomic Lua
script on Redis, with Redis ``TIME`` as the clock, so every relay on every host draws from
the same buckets.

Relays speak to a ``Limiter``: ``admit(candidates)`` answers which of them may be
dispatched now, each at which moment, and which keys turned some away until when. A
candidate goes only when every bucket of its rules (cluster, ``task:``, ``account:``,
``host:``, ``key:`` per label) holds a token; one that does not is skipped without
holding back the rest.

A bucket whose state is missing is full, unless the buckets may have been drained
shortly before they went missing: Redis restarted empty forgets every bucket while the
tasks it admitted are still being dispatched. So Redis also keeps a *drain floor* (no
TTL): the latest moment the lost buckets may have been drained up to. It is set once,
when the limiter first finds it missing, from the database's latest dispatch
(``restart_floor``), and a missing bucket refills from empty at that moment. Buckets that
merely expired (idle long enough to refill) are full either way.

Buckets can also come back *fuller* than they were: Redis replicates asynchronously, so a
replica promoted by a failover may never have seen the master's latest takes, and a Redis
restarted from an RDB or AOF file loses what it had not written out. The floor survives
those, so it alone would not step in. So the buckets have *generations*: Redis keeps, next
to the floor, the ``run_id`` of the server that started the current one (random at every
start of a redis-server) and its number, and each bucket records the generation that
wrote it. When the script finds itself on another server than the one named (a promoted
replica, or the same server restarted), it starts the next generation with a floor set
from the database as for a missing floor (never earlier than the floor kept), and every
bucket of an older generation holds at most what a missing bucket would: the lower of its
saved tokens and the refill since the floor (a lost take only ever left it fuller; a debt
it still shows is kept). Buckets no call names are judged so when next named. Any change
of server starts a generation, even one that lost nothing (a clean restart): the limiter
cannot tell, so it pauses as after a restart empty.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis

from throttler.constants import (
    RATE_BUCKET_KEY_PREFIX,
    RATE_DRAIN_FLOOR_KEY,
    RATE_GENERATION_KEY,
)
from throttler.limits import LimitKey, RuleSet, Scope, each_value

CLUSTER_KEY = LimitKey(scope=Scope.CLUSTER)
# The farthest ahead any relay takes tokens: relay.plan's horizon, stretched with its
# handover lead on a loaded machine, stays within it. A drain floor set while claims may be
# in flight covers this much whichever relay finds the buckets missing, since another
# relay's uncommitted claim may have reached this far ahead.
TAKE_AHEAD_LIMIT_S = 5.5
# Grant a token that float rounding left a hair short of whole, so that asking again
# after ``wait_s`` always succeeds; it lets a take run at most 1e-9 tokens early.
TOKEN_EPSILON = 1e-9
# A cluster that dispatched within this long before its buckets went missing may still
# have claims in flight that took tokens the database does not show yet (an uncommitted
# claim on PostgreSQL): the floor then also covers every token the lost buckets could
# have lent ahead (``horizon_s``).
ACTIVE_WITHIN_S = 60.0

Clock = Callable[[], float]
# The POSIX time of the latest dispatch the database knows of; None if there is none.
LastDispatch = Callable[[], Awaitable[float | None]]
# The drain floor of buckets that were never drained: a missing bucket is full.
NEVER_DRAINED = -math.inf


@dataclass(frozen=True, kw_only=True, slots=True)
class BucketState:
    """Tokens at ``updated_s`` (negative: taken ahead); a missing state: see ``refill``.

    ``rate_per_s``: the rate the tokens were counted at (None: unknown, a state written
    before rates could change), so that a rule changed since keeps the debt's meaning.
    ``generation``: the bucket generation it was written in (see ``refill``).
    """

    tokens: float
    updated_s: float
    rate_per_s: float | None = None
    generation: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Bucket:
    """One rate-limited key: where its state lives and how fast it refills."""

    key: LimitKey
    rate_per_s: float
    burst: int

    @property
    def redis_key(self) -> str:
        return RATE_BUCKET_KEY_PREFIX + str(self.key)


@dataclass(frozen=True, kw_only=True, slots=True)
class Request:
    """One candidate as ``decide`` sees it: its buckets (indexes) and its earliest time."""

    buckets: tuple[int, ...]
    not_before_s: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    """What ``decide`` answers; the Lua script answers the same, number for number."""

    states: tuple[BucketState, ...]
    # (request index, seconds from now until it may be dispatched), in request order.
    admitted: tuple[tuple[int, float], ...]
    # Bucket index -> seconds until it holds a token again, for buckets that refused one.
    blocked: Mapping[int, float]


def restart_floor(
    *,
    last_dispatch_s: float | None,
    now_s: float,
    horizon_s: float,
    previous_s: float = NEVER_DRAINED,
) -> float:
    """The drain floor to record when the buckets are found missing at ``now_s``.

    ``previous_s``: the floor Redis still holds when a new generation starts (a failover,
    a restart from a file); the new floor is never earlier than it.

    Nothing ever dispatched: minus infinity, every bucket full. A dispatch within
    ``ACTIVE_WITHIN_S``: assume the buckets were drained up to the latest token any claim
    could have taken ahead (``now_s`` plus ``horizon_s`` or ``TAKE_AHEAD_LIMIT_S``,
    whichever is longer: other relays' horizons may be longer than the caller's), or up
    to the last dispatch if that is later. An older last dispatch: the buckets were
    drained at most up to it.
    """
    if last_dispatch_s is None:
        return previous_s
    if last_dispatch_s >= now_s - ACTIVE_WITHIN_S:
        return max(previous_s, last_dispatch_s, now_s + max(horizon_s, TAKE_AHEAD_LIMIT_S))
    return max(previous_s, last_dispatch_s)


def refill(
    state: BucketState | None,
    *,
    now_s: float,
    rate_per_s: float,
    burst: int,
    drained_at_s: float = -math.inf,
    generation: int | None = None,
) -> BucketState:
    """Return the bucket as it stands at ``now_s``, in ``generation``.

    A missing bucket was empty at ``drained_at_s`` (the drain floor) and has
    refilled since; before that moment it is in debt. A bucket written in another
    generation (before a failover or a restart from a file, which may have lost its
    latest takes) holds at most what a missing one would: it may hold more tokens than
    were really left, never fewer, so the lower of the two is safe.

    Under a changed rule (``rate_per_s`` or ``burst`` not the state's): saved tokens
    beyond the new burst are gone (a lowered rate lets at most the new burst through at
    once), and a debt (tokens taken ahead for tasks already released to later moments)
    keeps its length in time, ``-tokens / rate``: the new rate's first token falls due
    when the old rate's last grant does, so the old and the new releases never overlap.
    """
    missing = min(float(burst), (now_s - drained_at_s) * rate_per_s)
    if state is None:
        return BucketState(
            tokens=missing, updated_s=now_s, rate_per_s=rate_per_s, generation=generation
        )
    saved = rescaled(state.tokens, saved_rate_per_s=state.rate_per_s, rate_per_s=rate_per_s)
    # A clock that steps back (another host's view, an explicit test time) refills nothing.
    elapsed_s = max(0.0, now_s - state.updated_s)
    tokens = min(float(burst), saved + elapsed_s * rate_per_s)
    if state.generation != generation:
        tokens = min(tokens, missing)
    return BucketState(
        tokens=tokens,
        updated_s=max(state.updated_s, now_s),
        rate_per_s=rate_per_s,
        generation=generation,
    )


def rescaled(tokens: float, *, saved_rate_per_s: float | None, rate_per_s: float) -> float:
    """Saved tokens under a new rate: a debt keeps its length in time (see ``refill``)."""
    if tokens >= 0 or saved_rate_per_s is None or saved_rate_per_s == rate_per_s:
        return tokens
    return tokens * rate_per_s / saved_rate_per_s


def decide(
    states: Sequence[BucketState | None],
    buckets: Sequence[Bucket],
    requests: Sequence[Request],
    *,
    now_s: float,
    horizon_s: float = 0.0,
    drained_at_s: float = -math.inf,
    generation: int | None = None,
) -> Decision:
    """Admit, in order, each request whose every bucket has a token due within the horizon.

    A token due within ``horizon_s`` may be taken ahead, leaving the bucket in debt: the
    request then goes at the latest of its buckets' token moments and its ``not_before_s``.
    Each bucket is charged as if the token were taken at that moment (a full bucket does
    not keep refilling while the request waits for another bucket), so every bucket sees
    exactly the dispatches of a token bucket. A refused request takes nothing and does not
    stop later ones. The Lua script in ``_ADMIT_LUA`` performs these exact operations in
    the same order. A missing state refills from ``drained_at_s``, and a state of another
    generation than ``generation`` holds at most that much (see ``refill``).
    """
    tokens: list[float] = []
    updated: list[float] = []
    for state, bucket in zip(states, buckets, strict=True):
        now_state = refill(
            state,
            now_s=now_s,
            rate_per_s=bucket.rate_per_s,
            burst=bucket.burst,
            drained_at_s=drained_at_s,
            generation=generation,
        )
        tokens.append(now_state.tokens)
        updated.append(now_state.updated_s)
    admitted: list[tuple[int, float]] = []
    refused: set[int] = set()
    for index, request in enumerate(requests):
        delay_s = 0.0
        if request.not_before_s is not None:
            delay_s = max(0.0, request.not_before_s - now_s)
            if delay_s > horizon_s:
                continue
        short = False
        for b in request.buckets:
            rate = buckets[b].rate_per_s
            if tokens[b] + horizon_s * rate + TOKEN_EPSILON < 1.0:
                refused.add(b)
                short = True
            else:
                delay_s = max(delay_s, (1.0 - tokens[b] - TOKEN_EPSILON) / rate)
        if short:
            continue
        for b in request.buckets:
            bucket = buckets[b]
            tokens[b] = min(tokens[b], bucket.burst - delay_s * bucket.rate_per_s) - 1.0
        admitted.append((index, delay_s))
    blocked = {b: _wait_s(tokens[b], buckets[b].rate_per_s) for b in sorted(refused)}
    states_out = tuple(
        BucketState(tokens=t, updated_s=u, rate_per_s=bucket.rate_per_s, generation=generation)
        for t, u, bucket in zip(tokens, updated, buckets, strict=True)
    )
    return Decision(states=states_out, admitted=tuple(admitted), blocked=blocked)


def _wait_s(tokens: float, rate_per_s: float) -> float:
    return 0.0 if tokens + TOKEN_EPSILON >= 1.0 else (1.0 - tokens) / rate_per_s


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    """A task asking to be dispatched, with what the rules look at."""

    task_id: str
    name: str
    account: str
    host: str | None = None
    # POSIX time before which the task must not be dispatched (tasks.run_at).
    not_before_s: float | None = None
    # The task's labels (tasks.labels, sorted): each a key: rule may limit.
    labels: tuple[str, ...] = ()


def new_candidate(
    *,
    task_id: str,
    name: str,
    account: str,
    host: str | None,
    not_before_s: float | None,
    labels: tuple[str, ...],
) -> Candidate:
    """``Candidate(...)``, at a third of its cost: a relay builds one per claimed row.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``;
    the slots' own setters do the same in a fraction of the time. Every field is given
    (tests.unit.test_planning_shortcuts holds this to ``Candidate``'s fields).
    """
    candidate = _new_object(Candidate)
    _set_task_id(candidate, task_id)
    _set_name(candidate, name)
    _set_account(candidate, account)
    _set_host(candidate, host)
    _set_not_before_s(candidate, not_before_s)
    _set_labels(candidate, labels)
    return candidate


_new_object = object.__new__
_set_task_id, _set_name, _set_account, _set_host, _set_not_before_s, _set_labels = (
    Candidate.__dict__[name].__set__
    for name in ("task_id", "name", "account", "host", "not_before_s", "labels")
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Admission:
    """Which candidates may go (in the order asked), when, and which keys turned some away."""

    admitted: tuple[Candidate, ...]
    # For each admitted candidate, seconds from the grant until it may be dispatched.
    ready_in_s: tuple[float, ...]
    # Keys that refused a candidate -> seconds from the grant until they hold a token.
    blocked: Mapping[LimitKey, float] = field(default_factory=dict)
    # POSIX time of the grant on the limiter's clock, shared by every relay (Redis TIME).
    granted_at_s: float = 0.0

    @property
    def wait_s(self) -> float:
        """Seconds until the cluster bucket can admit more; 0 when it was not the limit."""
        return self.blocked.get(CLUSTER_KEY, 0.0)


class Limiter(Protocol):
    """Decide which candidates may be dispatched, and when; admitted ones count as sent.

    ``horizon_s`` lets the limiter admit candidates whose turn comes within that time,
    each to be dispatched no earlier than its ``ready_in_s``.
    """

    async def admit(
        self, candidates: Sequence[Candidate], *, horizon_s: float = 0.0
    ) -> Admission: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class _Plan:
    """The candidates turned into ``decide``'s terms: distinct buckets and requests."""

    buckets: tuple[Bucket, ...]
    requests: tuple[Request, ...]


def plan(rules: RuleSet, candidates: Sequence[Candidate]) -> _Plan:
    """Find each candidate's rate-limited keys, numbering the distinct buckets.

    Candidates of one shape (name, account, host, labels) share their buckets, and those
    with the same earliest time too share one request: a claim's rows come in few shapes.
    """
    index: dict[LimitKey, int] = {}
    buckets: list[Bucket] = []
    requests: list[Request] = []
    shapes: dict[tuple[str, str, str | None, tuple[str, ...]], tuple[int, ...]] = {}
    shared: dict[tuple[tuple[int, ...], float | None], Request] = {}
    for candidate in candidates:
        shape = (candidate.name, candidate.account, candidate.host, candidate.labels)
        mine = shapes.get(shape)
        if mine is None:
            mine = shapes[shape] = _buckets_of(rules, candidate, index, buckets)
        asked = (mine, candidate.not_before_s)
        request = shared.get(asked)
        if request is None:
            request = shared[asked] = Request(buckets=mine, not_before_s=candidate.not_before_s)
        requests.append(request)
    return _Plan(buckets=tuple(buckets), requests=tuple(requests))


def _buckets_of(
    rules: RuleSet, candidate: Candidate, index: dict[LimitKey, int], buckets: list[Bucket]
) -> tuple[int, ...]:
    """The candidate's buckets' indexes, numbering (in ``index``) those not seen yet."""
    mine: list[int] = []
    for applied in rules.applicable(
        name=candidate.name,
        account=candidate.account,
        host=candidate.host,
        labels=candidate.labels,
    ):
        rate = applied.limit.rate_per_s
        if rate is None:
            continue
        if applied.key not in index:
            index[applied.key] = len(buckets)
            buckets.append(Bucket(key=applied.key, rate_per_s=rate, burst=applied.limit.burst))
        mine.append(index[applied.key])
    return tuple(mine)


def _admission(
    candidates: Sequence[Candidate], planned: _Plan, decision: Decision, *, granted_at_s: float
) -> Admission:
    return Admission(
        admitted=tuple(candidates[i] for i, _ in decision.admitted),
        ready_in_s=tuple(delay for _, delay in decision.admitted),
        blocked={planned.buckets[b].key: wait for b, wait in decision.blocked.items()},
        granted_at_s=granted_at_s,
    )


class UnlimitedLimiter:
    """No rate rules: admit everything, each candidate no sooner than its not-before."""

    def __init__(self, *, clock: Clock = time.time) -> None:
        self.clock = clock

    async def admit(self, candidates: Sequence[Candidate], *, horizon_s: float = 0.0) -> Admission:
        now_s = self.clock()
        return unlimited(candidates, now_s=now_s, horizon_s=horizon_s)


def unlimited(candidates: Sequence[Candidate], *, now_s: float, horizon_s: float) -> Admission:
    """What ``decide`` answers with no bucket, without its per-request work.

    Each candidate goes at its ``not_before_s`` (at once if that is past), unless that
    lies beyond the horizon; no key turns any away.
    """
    admitted: list[Candidate] = []
    ready_in_s: list[float] = []
    for candidate in candidates:
        not_before_s = candidate.not_before_s
        if not_before_s is None:
            delay_s = 0.0
        else:
            delay_s = max(0.0, not_before_s - now_s)
            if delay_s > horizon_s:
                continue
        admitted.append(candidate)
        ready_in_s.append(delay_s)
    return Admission(admitted=tuple(admitted), ready_in_s=tuple(ready_in_s), granted_at_s=now_s)


# KEYS: the buckets' hashes, then the drain floor, then the generation. ARGV: now_s
# ("" = Redis TIME), epsilon, horizon_s, the last dispatch ("" = not known yet, "-" =
# none), ACTIVE_WITHIN_S, TAKE_AHEAD_LIMIT_S, bucket count B, the server's identity ("" =
# its run_id from INFO), then rate and burst of each bucket, then per request:
# not_before_s ("" = none), its bucket count k, k bucket indexes (1-based).
# The generation key holds "<run_id of the server that started it> <number>". A missing
# floor, or a generation started on another server (a failover, or a restart from an RDB
# or AOF file that may have lost the latest takes), with the last dispatch not known yet
# returns {"floor?"} and changes nothing: the caller asks the database and calls again,
# and the script then starts the next generation with a floor no earlier than the one
# kept. A bucket last written in an older generation holds at most what a missing one
# would (throttle.refill); each bucket records the generation that wrote it.
# Numbers are written with %.17g so that they round-trip exactly (Lua's tostring keeps
# only 14 digits) and returned as strings (Redis truncates Lua numbers to integers).
# Returns: now, generation, admitted count, (request index, delay) per admitted request,
# refused count, (bucket index, wait) per refusing bucket, then (tokens, updated) per bucket.
_ADMIT_LUA = """
local function g(x) return string.format('%.17g', x) end
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
else
  now = tonumber(ARGV[1])
end
local eps = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local nb = tonumber(ARGV[7])
local floor_key = KEYS[nb + 1]
local generation_key = KEYS[nb + 2]
local server = ARGV[8]
if server == '' then
  -- run_id: random at every start of a redis-server, so another server, or this one
  -- restarted, has another (INFO gives 40 hex digits after 'run_id:'). A server that
  -- shows none is taken to be always the same one.
  local info = redis.call('INFO', 'server')
  local at = string.find(info, 'run_id:', 1, true)
  server = '?'
  if at then server = string.sub(info, at + 7, at + 46) end
end
local saved_keys = redis.call('MGET', floor_key, generation_key)
local saved_floor = saved_keys[1]
local gen = 0
local same_server = false
if saved_keys[2] then
  local space = string.find(saved_keys[2], ' ', 1, true)
  same_server = string.sub(saved_keys[2], 1, space - 1) == server
  gen = tonumber(string.sub(saved_keys[2], space + 1))
end
-- drained = nil: never drained, a missing bucket is full.
local drained = nil
if saved_floor and saved_floor ~= '-' then drained = tonumber(saved_floor) end
if not (saved_floor and same_server) then
  if ARGV[4] == '' then return {'floor?'} end
  if ARGV[4] ~= '-' then
    local last = tonumber(ARGV[4])
    local floor = last
    if last >= now - tonumber(ARGV[5]) then
      floor = math.max(last, now + math.max(horizon, tonumber(ARGV[6])))
    end
    if drained then floor = math.max(drained, floor) end
    drained = floor
  end
  if drained then
    redis.call('SET', floor_key, g(drained))
  else
    redis.call('SET', floor_key, '-')
  end
  gen = gen + 1
  redis.call('SET', generation_key, server .. ' ' .. gen)
end
local gen_s = tostring(gen)
local rate, burst, tokens, updated = {}, {}, {}, {}
for b = 1, nb do
  rate[b] = tonumber(ARGV[8 + 2 * b - 1])
  burst[b] = tonumber(ARGV[8 + 2 * b])
  local missing = burst[b]
  if drained then missing = math.min(burst[b], (now - drained) * rate[b]) end
  local saved = redis.call('HMGET', KEYS[b], 'tokens', 'updated_s', 'rate', 'gen')
  if saved[1] and saved[2] then
    local elapsed = math.max(0.0, now - tonumber(saved[2]))
    local kept = tonumber(saved[1])
    -- A rule changed since: a debt keeps its length in time (throttle.rescaled).
    if saved[3] and kept < 0 and tonumber(saved[3]) ~= rate[b] then
      kept = kept * rate[b] / tonumber(saved[3])
    end
    tokens[b] = math.min(burst[b], kept + elapsed * rate[b])
    -- Written in an older generation: it may have lost takes (throttle.refill).
    if saved[4] ~= gen_s then tokens[b] = math.min(tokens[b], missing) end
    updated[b] = math.max(tonumber(saved[2]), now)
  else
    tokens[b] = missing
    updated[b] = now
  end
end
local admitted = {}
local refused = {}
local pos = 8 + 2 * nb + 1
local index = 0
while pos <= #ARGV do
  local nbefore = ARGV[pos]
  local k = tonumber(ARGV[pos + 1])
  local mine = {}
  for j = 1, k do mine[j] = tonumber(ARGV[pos + 1 + j]) end
  pos = pos + 2 + k
  local delay = 0.0
  local skip = false
  if nbefore ~= '' then
    delay = math.max(0.0, tonumber(nbefore) - now)
    if delay > horizon then skip = true end
  end
  if not skip then
    local short = false
    for j = 1, k do
      local b = mine[j]
      if tokens[b] + horizon * rate[b] + eps < 1.0 then
        refused[b] = true
        short = true
      else
        delay = math.max(delay, (1.0 - tokens[b] - eps) / rate[b])
      end
    end
    if not short then
      for j = 1, k do
        local b = mine[j]
        tokens[b] = math.min(tokens[b], burst[b] - delay * rate[b]) - 1.0
      end
      admitted[#admitted + 1] = index
      admitted[#admitted + 1] = g(delay)
    end
  end
  index = index + 1
end
local reply = {g(now), gen, #admitted / 2}
for i = 1, #admitted do reply[#reply + 1] = admitted[i] end
local blocked = {}
for b = 1, nb do
  if refused[b] then
    local wait = 0.0
    if tokens[b] + eps < 1.0 then wait = (1.0 - tokens[b]) / rate[b] end
    blocked[#blocked + 1] = b - 1
    blocked[#blocked + 1] = g(wait)
  end
end
reply[#reply + 1] = #blocked / 2
for i = 1, #blocked do reply[#reply + 1] = blocked[i] end
for b = 1, nb do
  redis.call('HSET', KEYS[b], 'tokens', g(tokens[b]), 'updated_s', g(updated[b]),
    'rate', g(rate[b]), 'gen', gen_s)
  -- Once idle long enough to refill, a missing key means the same as a full bucket
  -- (unless the drain floor is later: then it is emptier, which errs on the safe side).
  redis.call('PEXPIRE', KEYS[b], math.ceil((burst[b] - tokens[b]) / rate[b] * 1000) + 1000)
  reply[#reply + 1] = g(tokens[b])
  reply[#reply + 1] = g(updated[b])
end
return reply
"""


class RedisLimiter:
    """Every bucket in Redis, shared by every relay, judged in one atomic call.

    ``last_dispatch`` is asked (rarely: when Redis has lost the drain floor) for the
    database's latest dispatch; without it the limiter assumes there was none.
    """

    def __init__(
        self, *, redis: Redis, rules: RuleSet, last_dispatch: LastDispatch | None = None
    ) -> None:
        self.rules = rules
        self._script = redis.register_script(_ADMIT_LUA)
        self._last_dispatch = last_dispatch or _never_dispatched

    async def decide(
        self,
        buckets: Sequence[Bucket],
        requests: Sequence[Request],
        *,
        now_s: float | None = None,
        horizon_s: float = 0.0,
        server: str | None = None,
    ) -> tuple[float, Decision]:
        """Run ``decide`` atomically in Redis, in the generation it finds or starts.

        ``now_s`` replaces Redis TIME and ``server`` the server's run_id (tests only).
        """
        args: list[str | int] = [
            "" if now_s is None else repr(float(now_s)),
            repr(TOKEN_EPSILON),
            repr(float(horizon_s)),
            "",
            repr(ACTIVE_WITHIN_S),
            repr(TAKE_AHEAD_LIMIT_S),
            len(buckets),
            server or "",
        ]
        for bucket in buckets:
            args += [repr(float(bucket.rate_per_s)), bucket.burst]
        # Candidates of one shape and moment share a Request (``plan``): spelled once each.
        spelled: dict[int, list[str | int]] = {}
        for request in requests:
            words = spelled.get(id(request))
            if words is None:
                nb_s = request.not_before_s
                not_before = "" if nb_s is None else repr(float(nb_s))
                words = [not_before, len(request.buckets), *(b + 1 for b in request.buckets)]
                spelled[id(request)] = words
            args += words
        keys = [
            *(bucket.redis_key for bucket in buckets),
            RATE_DRAIN_FLOOR_KEY,
            RATE_GENERATION_KEY,
        ]
        reply = await self._script(keys=keys, args=args)
        if reply[0] in (b"floor?", "floor?"):
            # Redis lost its state (restarted empty), this cluster is new, or another
            # server holds the buckets now (a failover, a restart from a file).
            last = await self._last_dispatch()
            args[3] = "-" if last is None else repr(float(last))
            reply = await self._script(keys=keys, args=args)
        now = float(reply[0])
        generation = int(reply[1])
        pos = 2
        count = int(reply[pos])
        end = pos + 1 + 2 * count
        admitted = tuple(
            zip(
                map(int, reply[pos + 1 : end : 2]),
                map(float, reply[pos + 2 : end : 2]),
                strict=True,
            )
        )
        pos += 1 + 2 * count
        count = int(reply[pos])
        blocked = {int(reply[pos + 1 + 2 * i]): float(reply[pos + 2 + 2 * i]) for i in range(count)}
        pos += 1 + 2 * count
        states = tuple(
            BucketState(
                tokens=float(reply[pos + 2 * b]),
                updated_s=float(reply[pos + 2 * b + 1]),
                rate_per_s=buckets[b].rate_per_s,
                generation=generation,
            )
            for b in range(len(buckets))
        )
        return now, Decision(states=states, admitted=admitted, blocked=blocked)

    async def admit(self, candidates: Sequence[Candidate], *, horizon_s: float = 0.0) -> Admission:
        planned = plan(self.rules, candidates)
        if not candidates:
            return Admission(admitted=(), ready_in_s=(), granted_at_s=time.time())
        now_s, decision = await self.decide(planned.buckets, planned.requests, horizon_s=horizon_s)
        return _admission(candidates, planned, decision, granted_at_s=now_s)


async def _never_dispatched() -> float | None:
    return None


def has_rates(rules: RuleSet) -> bool:
    return any(rule.limit.rate_per_s is not None for rule in rules.rules)


def build_limiter(
    *, redis: Redis, rules: RuleSet, last_dispatch: LastDispatch | None = None
) -> Limiter:
    """Return the limiter for these rules: Redis buckets, or none when no rule has a rate."""
    if not has_rates(rules):
        return UnlimitedLimiter()
    return RedisLimiter(redis=redis, rules=rules, last_dispatch=last_dispatch)


def max_admissible(rules: RuleSet, *, horizon_s: float) -> int | None:
    """How many tasks the cluster rule can admit in one go (None: no cluster rate)."""
    for applied in rules.applicable(name="", account=""):
        if applied.key == CLUSTER_KEY and applied.limit.rate_per_s is not None:
            return math.ceil(applied.limit.rate_per_s * horizon_s) + applied.limit.burst
    return None


class InflightCaps:
    """The in-flight caps of a rule set: which keys a task occupies, and who still fits.

    Pure: the caller counts tasks in flight per key (``count_inflight_by_key``) inside a
    transaction that other claims wait for, and passes the counts in.
    """

    def __init__(self, rules: RuleSet) -> None:
        self.rules = rules
        self._index = {(rule.scope, rule.value): rule for rule in rules.rules}
        self.scopes = frozenset(r.scope for r in rules.rules if r.limit.inflight is not None)

    def __bool__(self) -> bool:
        return bool(self.scopes)

    def cap(self, key: LimitKey) -> int | None:
        """The key's cap: its own rule's, else its scope's ``*`` rule's (None: no cap)."""
        rule = self._index.get((key.scope, key.value))
        if rule is None and key.scope is not Scope.CLUSTER:
            rule = self._index.get((key.scope, each_value(key)))
        return None if rule is None else rule.limit.inflight

    def keys(self, candidate: Candidate) -> list[LimitKey]:
        """The capped keys a candidate would occupy."""
        applied = self.rules.applicable(
            name=candidate.name,
            account=candidate.account,
            host=candidate.host,
            labels=candidate.labels,
        )
        return [a.key for a in applied if a.limit.inflight is not None]

    def full(self, inflight: Mapping[LimitKey, int]) -> set[LimitKey]:
        """Keys with no free slot."""
        return {key for key, count in inflight.items() if count >= (self.cap(key) or _NO_CAP)}

    def fit(
        self,
        candidates: Sequence[Candidate],
        inflight: Mapping[LimitKey, int],
        *,
        room: int | None = None,
        holding: frozenset[str] = frozenset(),
    ) -> tuple[list[Candidate], bool]:
        """Keep, in order, the candidates every cap (and ``room`` in all) has a slot for.

        Candidates in ``holding`` (task ids) already hold their slots and always fit.
        Returns the kept candidates and whether any was left out.
        """
        if not self.scopes and room is None:
            # No cap and no room to count: every candidate fits.
            return list(candidates), False
        kept: list[Candidate] = []
        # Each capped key met gets a slot holding its free places (negative: over its
        # cap), and each shape (name, account, host, labels) its keys' slots: a claim's
        # rows come in few shapes, and counting by slot hashes no key per row.
        slot_of: dict[LimitKey, int] = {}
        free: list[int] = []
        shapes: dict[tuple[str, str, str | None, tuple[str, ...]], tuple[int, ...]] = {}
        left_out = False
        for candidate in candidates:
            if candidate.task_id in holding:
                kept.append(candidate)
                continue
            slots: tuple[int, ...] = ()
            if self.scopes:
                shape = (candidate.name, candidate.account, candidate.host, candidate.labels)
                found = shapes.get(shape)
                if found is None:
                    found = shapes[shape] = self._slots(candidate, inflight, slot_of, free)
                slots = found
            fits = room is None or room > 0
            for slot in slots if fits else ():
                if free[slot] <= 0:
                    fits = False
                    break
            if not fits:
                left_out = True
                continue
            for slot in slots:
                free[slot] -= 1
            if room is not None:
                room -= 1
            kept.append(candidate)
        return kept, left_out

    def _slots(
        self,
        candidate: Candidate,
        inflight: Mapping[LimitKey, int],
        slot_of: dict[LimitKey, int],
        free: list[int],
    ) -> tuple[int, ...]:
        """The slots of the candidate's capped keys, opening those not met yet."""
        slots: list[int] = []
        for key in self.keys(candidate):
            slot = slot_of.get(key)
            if slot is None:
                slot = slot_of[key] = len(free)
                free.append((self.cap(key) or _NO_CAP) - inflight.get(key, 0))
            slots.append(slot)
        return tuple(slots)


_NO_CAP = 2**62
