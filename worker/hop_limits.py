"""Host limits on a download's redirect hops: take the new host's token, or refuse the hop.

The relay releases a download under the ``host:`` rule of its URL's host; a redirect to
another host would reach that host with none of its tokens taken. So before the worker
follows a hop to a host that this attempt has not contacted yet, it looks up that
host's rule (its own, else ``host:*``, as the relay does):

- no rule: the hop is followed at once;
- a rule with an in-flight cap (``inflight=``): the hop is refused, and the task fails
  without a retry. The cap counts tasks by the host they were submitted for, under the
  relay's claim lock; a worker cannot take a slot of another host halfway through a
  task. The error names the host and tells the submitter to submit the final URL;
- a rule with a rate: the worker takes a token from the very Redis bucket the relays
  use (``RedisLimiter.decide``, same key, same arithmetic), waiting until the bucket
  holds one if it is empty. A token that cannot come within the time the download has
  left is not waited for; the attempt fails retriably and the task is tried again after
  its backoff.

The rules are those in force: ``RELAY_LIMITS`` overridden by the rules set through the
API (throttler.limits_in_force), read again when their version moved, looked at no more
often than ``LIMITS_CHECK_EVERY_S`` and only when a hop needs a rule. A hop to a paused
host waits for the pause's end if the download has the time, else fails retriably.

A hop to the task's own host, or to a host already paid for in this attempt, takes
nothing: a ``host:`` limit counts downloads, the relay charged this one for its host,
and ``DOWNLOAD_MAX_REDIRECTS`` bounds the requests one download makes.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.dispatches import last_dispatch_from
from throttler.hosts import url_host_key
from throttler.limits import EACH, Limit, LimitKey, RuleSet, Scope
from throttler.limits_in_force import RulesInForce, in_force
from throttler.logs import fields
from throttler.models import utcnow
from throttler.redis_conn import redis_client
from throttler.settings import Settings
from throttler.store.limits import LimitStore
from throttler.store.recovery import open_recovery
from throttler.throttle import Bucket, RedisLimiter, Request
from worker.taskkit.errors import PermanentError, RetriableError

log = logging.getLogger("worker.hop_limits")
# Shortest wait before asking the bucket again, so that float rounding cannot spin.
_MIN_WAIT_S = 0.001
# How stale the rules a hop looks at may be: a change through the API reaches hops as
# fast as it reaches the relays.
LIMITS_CHECK_EVERY_S = 0.5


@dataclass(kw_only=True, slots=True)
class _Cached:
    """The rules in force as last read, and when (the event loop's clock)."""

    rules: RulesInForce | None = None
    version: int = -1
    checked_at: float = -math.inf


def _paused_until(current: RulesInForce, host: LimitKey) -> datetime | None:
    paused = current.paused_at(utcnow())
    keys = (host, LimitKey(scope=Scope.HOST, value=EACH))
    return max((paused[k] for k in keys if k in paused), default=None)


class RedirectRefused(PermanentError):
    """A redirect leads to a host whose limit a hop cannot honour."""


def hop_host_key(target: httpx.URL) -> str:
    """The ``host:`` key of a redirect target; PermanentError if its host is not valid."""
    try:
        return url_host_key(target)
    except ValueError as error:
        raise RedirectRefused(
            f"refused redirect to {target}: its host is not valid: {error}"
        ) from None


@dataclass(frozen=True, kw_only=True, slots=True)
class HopLimits:
    """The ``host:`` rules in force, and the shared buckets to take hop tokens from."""

    # RELAY_LIMITS' rules; those set through the API (``limits``) override them.
    rules: RuleSet
    # None when no host: rule can have a rate: no hop ever needs a token.
    limiter: RedisLimiter | None = None
    # The limiter's own connection, closed with it (None when there is no limiter).
    redis: Redis | None = None
    # Rules and pauses set through the API; None: RELAY_LIMITS' rules only.
    limits: LimitStore | None = None
    _cached: _Cached = field(default_factory=_Cached)

    @classmethod
    def open(cls, settings: Settings, engine: AsyncEngine) -> HopLimits:
        """The worker's hop limits: the rules in force on the relays' Redis buckets.

        Always with a limiter: a rule with a rate may be set through the API at any time
        (the Redis client connects on first use only).
        """
        rules = settings.limit_rules
        # A connection of its own, not ARQ's pool: the worker's service replaces that pool
        # after a Redis outage. redis-py connects on first use and reconnects by itself.
        redis = redis_client(settings)
        # A limiter that finds the drain floor gone (Redis restarted empty) sets it from
        # the database's last dispatch, exactly as a relay would.
        last_dispatch = last_dispatch_from(open_recovery(settings, engine))
        limiter = RedisLimiter(redis=redis, rules=rules, last_dispatch=last_dispatch)
        return cls(rules=rules, limiter=limiter, redis=redis, limits=LimitStore(engine))

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    async def before_hop(self, target: httpx.URL, *, paid: set[str], time_left_s: float) -> None:
        """Hold the hop to ``target`` until its host's limit allows it, or refuse it.

        ``paid`` holds the host keys this attempt already contacted (the task's own host
        first); the hop's key is added once it may go.
        """
        key = hop_host_key(target)
        if key in paid:
            return
        host = LimitKey(scope=Scope.HOST, value=key)
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + time_left_s
        while True:
            current = await self._in_force()
            until = _paused_until(current, host)
            if until is None:
                break
            await self._wait_out_pause(key, until, target=target, deadline_s=deadline_s)
        rule = current.rules.rule_for(host)
        if rule is not None and rule.limit.inflight is not None:
            raise RedirectRefused(
                f"refused redirect to {target}: host {key} has a limit on downloads in "
                "flight, which a redirect from another host cannot respect; submit the "
                "final URL instead"
            )
        if rule is not None and rule.limit.rate_per_s is not None:
            time_left_s = deadline_s - loop.time()
            await self._take_token(key, rule.limit, target=target, time_left_s=time_left_s)
        paid.add(key)

    async def paused_until(self, key: str) -> datetime | None:
        """When the pause of host ``key`` (its own or ``host:*``) ends; None: not paused."""
        return _paused_until(await self._in_force(), LimitKey(scope=Scope.HOST, value=key))

    def forget(self) -> None:
        """Read the rules again at the next look: this worker just changed them (an
        upstream pause), and its other downloads must see it at once."""
        self._cached.checked_at = -math.inf

    async def _in_force(self) -> RulesInForce:
        """The rules in force now, read again when their version moved."""
        cached = self._cached
        if self.limits is None:
            return cached.rules or RulesInForce(rules=self.rules)
        now_s = asyncio.get_running_loop().time()
        if cached.rules is None or now_s - cached.checked_at >= LIMITS_CHECK_EVERY_S:
            if await self.limits.version() != cached.version:
                overrides = await self.limits.overrides()
                cached.rules = in_force(self.rules, overrides.rows)
                cached.version = overrides.version
            cached.checked_at = now_s
        assert cached.rules is not None
        return cached.rules

    async def _wait_out_pause(
        self, key: str, until: datetime, *, target: httpx.URL, deadline_s: float
    ) -> None:
        loop = asyncio.get_running_loop()
        wait_s = (until - utcnow()).total_seconds()
        if wait_s > deadline_s - loop.time():
            raise RetriableError(
                f"redirect to {target}: host {key} is paused until {until.isoformat()}, "
                "longer than the download has left; trying again later"
            )
        log.debug("download.hop_paused", extra=fields(host=key, wait_s=round(wait_s, 3)))
        # No longer than the rules may be stale: a resume lets the hop go at once.
        await asyncio.sleep(max(_MIN_WAIT_S, min(wait_s, LIMITS_CHECK_EVERY_S)))

    async def _take_token(
        self, key: str, limit: Limit, *, target: httpx.URL, time_left_s: float
    ) -> None:
        assert limit.rate_per_s is not None
        if self.limiter is None:
            raise RuntimeError("a host: rule has a rate but the hop limits have no limiter")
        bucket = Bucket(
            key=LimitKey(scope=Scope.HOST, value=key),
            rate_per_s=limit.rate_per_s,
            burst=limit.burst,
        )
        loop = asyncio.get_running_loop()
        deadline_s = loop.time() + time_left_s
        while True:
            # No horizon (no token taken ahead): a limiter that finds the drain floor gone
            # sets it to now plus its horizon, and the download's whole time left would
            # stall every relay's buckets that long. Wait here instead, then ask again.
            _now_s, decision = await self.limiter.decide([bucket], [Request(buckets=(0,))])
            if decision.admitted:
                return
            wait_s = max(decision.blocked.get(0, 0.0), _MIN_WAIT_S)
            if wait_s > deadline_s - loop.time():
                raise RetriableError(
                    f"redirect to {target}: host {key}'s rate limit has no token for "
                    f"{wait_s:.1f}s, more than the download has left; trying again later"
                )
            log.debug("download.hop_waits", extra=fields(host=key, wait_s=round(wait_s, 3)))
            await asyncio.sleep(wait_s)
