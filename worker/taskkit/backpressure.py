"""An upstream push-back (``Backpressure``): pause the scope, then run the task after it.

The pause is the API's own (throttler.store.limits.change_limit, kind ``pause``, reason
``upstream``, by the task id), which only ever extends a pause already there, so every
relay stops releasing the scope's tasks within a claim, and hops to it wait
(worker.hop_limits). It is committed in its own transaction just before the attempt's
outcome, not in the outcome's: outcomes are group-committed by the status writer, on
SQLite over a plain ``sqlite3`` connection of its own (throttler.store.sqlite_attempts)
where the store's SQLAlchemy function cannot run without a second copy of it. The order
keeps a crash harmless: a pause without its outcome leaves the task ``running``, and
recovery puts it back through the outbox as for any lost worker.

The task goes back to the outbox with ``run_at`` at the pause's end, and the attempt
spends none of its tries (``tries_base`` moves up by one, as after an explicit retry;
``attempts`` still counts it): the request was refused, not done, so this holds for
side-effecting tasks too. So that a task pushed back forever still ends, only attempts
below ``UPSTREAM_MAX_PUSHBACKS`` are spared; past it a push-back spends a try as any
retriable failure does (the pause is still recorded).
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from redis.asyncio import Redis

from throttler.constants import LIMITS_CHANNEL
from throttler.errors import REDIS_ERRORS
from throttler.limits import LimitRuleError
from throttler.limits_in_force import parse_scope
from throttler.logs import fields
from throttler.models import utcnow
from throttler.settings import Settings
from throttler.store.attempts import Attempt
from throttler.store.limits import ChangeKind, ChangeReason, LimitStore
from worker.taskkit.errors import Backpressure, PermanentError, ScopePaused
from worker.taskkit.persist import retry_until_written
from worker.taskkit.resources import Resources

log = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT_S = 0.5


@dataclass(frozen=True, kw_only=True, slots=True)
class PushedBack:
    """A recorded push-back: the pause's end (perhaps a longer pause already there)."""

    scope: str
    until: datetime
    now: datetime


def pause_s(settings: Settings, retry_after_s: float) -> float:
    """The pause asked for, within [0, UPSTREAM_MAX_PAUSE_S] (not a number: the default)."""
    if math.isnan(retry_after_s):
        return settings.upstream_default_pause_s
    return min(max(retry_after_s, 0.0), settings.upstream_max_pause_s)


def spares_try(settings: Settings, attempt: Attempt) -> bool:
    """Whether this push-back spends none of the task's tries (see the module)."""
    return attempt.attempt < settings.upstream_max_pushbacks


async def push_back(
    resources: Resources, attempt: Attempt, error: Backpressure, *, redis: Redis | None
) -> PushedBack:
    """Pause ``error.scope`` (reason upstream, by the task id) and tell the relays.

    Raises PermanentError when the scope is not one the limits name.
    """
    try:
        key = parse_scope(error.scope)
    except LimitRuleError as invalid:
        raise PermanentError(f"Backpressure names no scope: {invalid}") from None
    now = utcnow()
    until = now + timedelta(seconds=pause_s(resources.settings, error.retry_after_s))
    if isinstance(error, ScopePaused):
        return PushedBack(scope=str(key), until=until, now=now)
    store = LimitStore(resources.engine)
    answer = await retry_until_written(
        lambda: store.change(
            ChangeKind.PAUSE,
            key=key,
            by=attempt.task_id,
            now=now,
            paused_until=until,
            reason=ChangeReason.UPSTREAM,
        ),
        task_id=attempt.task_id,
        what="upstream pause",
    )
    paused_until = answer.after.paused_until if answer.after is not None else None
    pushed = PushedBack(scope=str(key), until=max(until, paused_until or until), now=now)
    log.warning(
        "task.pushed_back",
        extra=fields(
            task_id=attempt.task_id,
            scope=pushed.scope,
            retry_after_s=error.retry_after_s,
            paused_until=pushed.until.isoformat(),
        ),
    )
    # This worker's other downloads of the scope see the pause at their next request.
    resources.hops.forget()
    if redis is not None:
        await _announce(redis)
    return pushed


async def _announce(redis: Redis) -> None:
    """Tell relays to reload now, as the API does after a change (they also notice by
    themselves within half a second)."""
    try:
        async with asyncio.timeout(ANNOUNCE_TIMEOUT_S):
            await redis.publish(LIMITS_CHANNEL, b"1")
    except REDIS_ERRORS as error:
        log.debug("limits.change_not_announced", extra=fields(error=repr(error)))
