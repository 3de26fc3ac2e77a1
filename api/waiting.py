"""Why a pending task waits, as the task views show it: the relays' boards, read once.

A request that shows tasks reads the boards once (``look``: the live relays from the node
registry and every relay's board, in one round trip) and then names each pending task's reason
with ``throttler.waiting.why_waiting``: what the relays decided with, never a verdict of
the API's own. When Redis cannot be asked, ``waiting`` is null: the view, read from the
database, still stands. A submit's answer asks nothing: its task can only be waiting for
its ``run_at``, or for its turn (``TaskPublic.pending``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from api.schemas import TaskPublic
from throttler.constants import WAITING_BOARDS_KEY
from throttler.errors import REDIS_ERRORS
from throttler.logs import fields
from throttler.models import utcnow
from throttler.nodes import NodeKind, NodeRegistry
from throttler.statuses import TaskStatus
from throttler.store.reads import TaskView
from throttler.waiting import (
    NOTHING_SEEN,
    Waiting,
    WaitingBoard,
    merge,
    task_keys,
    why_waiting,
)

log = logging.getLogger(__name__)

# A view waits at most this long for the boards, then shows ``waiting`` null.
LOOK_TIMEOUT_S = 0.5


@dataclass(frozen=True, kw_only=True, slots=True)
class Sighting:
    """What one request saw of the relays."""

    # False: Redis could not be asked (then every ``waiting`` is null).
    known: bool
    # The live relays' boards merged; None: no relay is alive.
    board: WaitingBoard | None = None


UNKNOWN = Sighting(known=False)


async def look(redis: Redis, *, now: datetime) -> Sighting:
    """Read the live relays and their boards: one round trip.

    A live relay without a current board saw nothing holding anything back.
    """
    registry = NodeRegistry(redis)
    try:
        async with asyncio.timeout(LOOK_TIMEOUT_S):
            async with redis.pipeline(transaction=False) as pipe:
                registry.read_alive(pipe)
                pipe.hgetall(WAITING_BOARDS_KEY)
                members, raws = await pipe.execute()
    except REDIS_ERRORS as error:
        log.debug("waiting.unknown", extra=fields(error=repr(error)))
        return UNKNOWN
    alive = set(NodeRegistry.alive_of(NodeKind.RELAY, members))
    if not alive:
        return Sighting(known=True)
    boards = []
    for relay_id, raw in raws.items():
        if _text(relay_id) not in alive:
            continue  # a dead relay's, not pruned yet
        try:
            board = WaitingBoard.decode(raw)
        except ValueError as error:
            # Written by another version of the relay: its verdicts are not ours to guess.
            log.debug("waiting.unreadable", extra=fields(error=repr(error)))
            continue
        if board.expires_at is None or board.expires_at > now:
            boards.append(board)
    return Sighting(known=True, board=merge(boards) or NOTHING_SEEN)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def waiting_of(
    *,
    status: TaskStatus,
    run_at: datetime | None,
    name: str,
    account: str,
    host: str | None,
    sighting: Sighting,
    now: datetime,
    labels: Sequence[str] = (),
) -> Waiting | None:
    """One task's reason from what the request saw (None: not pending, or unknown)."""
    if status is not TaskStatus.PENDING or not sighting.known:
        return None
    return why_waiting(
        status=status,
        run_at=run_at,
        keys=task_keys(name=name, account=account, host=host, labels=labels),
        board=sighting.board,
        now=now,
    )


class WaitingReporter:
    """Task views with their reasons, for one request: the boards read at most once."""

    def __init__(self, *, redis: Redis) -> None:
        self.redis = redis

    async def views(self, tasks: Sequence[TaskView], *, account: str) -> list[TaskPublic]:
        """``account``'s tasks as views; Redis is asked only if one of them is pending."""
        pending = any(task.status is TaskStatus.PENDING for task in tasks)
        now = utcnow()
        sighting = await look(self.redis, now=now) if pending else UNKNOWN
        return [
            TaskPublic.from_task(
                task,
                waiting=waiting_of(
                    status=task.status,
                    run_at=task.run_at,
                    name=task.name,
                    account=account,
                    host=task.host,
                    sighting=sighting,
                    now=now,
                    labels=task.labels,
                ),
            )
            for task in tasks
        ]

    async def view(self, task: TaskView, *, account: str) -> TaskPublic:
        [public] = await self.views([task], account=account)
        return public


async def get_waiting_reporter(request: Request) -> WaitingReporter:
    return WaitingReporter(redis=request.app.state.redis)


# Task views with ``waiting`` filled from the live relays' boards.
WaitingDep = Annotated[WaitingReporter, Depends(get_waiting_reporter)]
