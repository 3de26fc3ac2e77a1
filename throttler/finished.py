"""Announce finished tasks on Redis pub/sub, so API long-polls answer at once.

Best effort by design: the database is the source of truth and the API also checks its
waited tasks in the database every second, so a lost announcement (Redis away, no
subscriber yet) costs at most that second, never a result.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from redis.asyncio import Redis

from throttler.constants import FINISHED_CHANNEL
from throttler.errors import REDIS_ERRORS
from throttler.logs import fields
from throttler.retry import Outage

log = logging.getLogger(__name__)

# A dead Redis must not hold a worker's job slot or a reconcile pass for long.
PUBLISH_TIMEOUT_S = 1.0


def announce_outage() -> Outage:
    """One WARNING when announcements start failing and one when they go through again.

    For a publisher that announces round after round (a worker's status writer): while
    Redis is away each round fails, and a line per round would bury the one that matters.
    """
    return Outage(
        log,
        down_event="task.finish_not_announced",
        up_event="task.finish_announced_again",
    )


async def publish_finished(
    redis: Redis,
    *,
    task_ids: Sequence[str],
    timeout_s: float = PUBLISH_TIMEOUT_S,
    outage: Outage | None = None,
) -> None:
    """Publish each id on ``FINISHED_CHANNEL``; call only after the terminal write commits.

    A failure is logged through ``outage`` when given, else as a WARNING of its own.
    """
    if not task_ids:
        return
    try:
        async with asyncio.timeout(timeout_s), redis.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.publish(FINISHED_CHANNEL, task_id)
            await pipe.execute()
    except REDIS_ERRORS as error:
        if outage is not None:
            outage.failed(error)
            return
        log.warning(
            "task.finish_not_announced",
            extra=fields(task_ids=",".join(task_ids[:10]), count=len(task_ids), error=repr(error)),
        )
        return
    if outage is not None:
        outage.succeeded()
