"""Database writes that must not be lost: one transaction each, retried on transient errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession

from throttler.db import SessionFactory
from throttler.logs import fields

log = logging.getLogger(__name__)

# Connection loss, lock timeouts, a full pool: worth another try after a pause.
TRANSIENT_DB_ERRORS: tuple[type[Exception], ...] = (DBAPIError, PoolTimeoutError, OSError)
WRITE_TRIES = 5
WRITE_BACKOFF_S = 0.2


async def write_with_retry(
    write: Callable[[AsyncSession], Awaitable[bool]],
    *,
    sessions: SessionFactory,
    task_id: str,
    what: str,
    tries: int = WRITE_TRIES,
    backoff_s: float = WRITE_BACKOFF_S,
) -> bool:
    """Run ``write`` in its own transaction, retrying transient errors; re-raise the last one.

    A cancellation (worker shutdown) that arrives while the write is in flight waits for
    the write to finish before it propagates: the attempt already ran, and losing its
    outcome would leave a side-effecting task looking unfinished.
    """
    pending = asyncio.ensure_future(
        _write_loop(
            write, sessions=sessions, task_id=task_id, what=what, tries=tries, backoff_s=backoff_s
        )
    )
    try:
        return await asyncio.shield(pending)
    except asyncio.CancelledError:
        if not pending.done():
            await pending
        raise


async def _write_loop(
    write: Callable[[AsyncSession], Awaitable[bool]],
    *,
    sessions: SessionFactory,
    task_id: str,
    what: str,
    tries: int,
    backoff_s: float,
) -> bool:
    for attempt in range(1, tries + 1):
        try:
            async with sessions.begin() as session:
                return await write(session)
        except TRANSIENT_DB_ERRORS as error:
            if attempt == tries:
                log.exception(
                    "task.write_failed",
                    extra=fields(task_id=task_id, write=what, tries=tries, error=repr(error)),
                )
                raise
            delay_s = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "task.write_retry",
                extra=fields(
                    task_id=task_id,
                    write=what,
                    failed_try=attempt,
                    delay_s=delay_s,
                    error=repr(error),
                ),
            )
            await asyncio.sleep(delay_s)
    raise AssertionError("unreachable: tries must be >= 1")
