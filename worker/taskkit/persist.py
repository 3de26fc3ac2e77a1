"""Database writes that must not be lost: retried until written.

``write_with_retry`` runs a write in its own transaction; ``retry_until_written`` retries any
one-try write, such as handing an outcome to the worker's status writer (see
worker.taskkit.status_writer), where it shares a transaction with other jobs' writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from throttler.db import SessionFactory
from throttler.errors import STATEMENT_ERRORS, TRANSIENT_DB_ERRORS
from throttler.logs import fields

log = logging.getLogger(__name__)
T = TypeVar("T")

# Pause after the first failed try; doubles after each further one, up to the cap.
WRITE_BACKOFF_S = 0.2
WRITE_BACKOFF_MAX_S = 2.0


class WriteAbandoned(Exception):
    """The worker is stopping and the database never took the write."""


async def write_with_retry(
    write: Callable[[AsyncSession], Awaitable[bool]],
    *,
    sessions: SessionFactory,
    task_id: str,
    what: str,
    backoff_s: float = WRITE_BACKOFF_S,
    backoff_max_s: float = WRITE_BACKOFF_MAX_S,
) -> bool:
    """Run ``write`` in its own transaction, retrying transient errors until it is written."""

    async def once() -> bool:
        async with sessions.begin() as session:
            return await write(session)

    return await retry_until_written(
        once, task_id=task_id, what=what, backoff_s=backoff_s, backoff_max_s=backoff_max_s
    )


async def retry_until_written(
    write_once: Callable[[], Awaitable[T]],
    *,
    task_id: str,
    what: str,
    backoff_s: float = WRITE_BACKOFF_S,
    backoff_max_s: float = WRITE_BACKOFF_MAX_S,
    shielded: bool = True,
) -> T:
    """Call ``write_once`` (one try, committed when it returns) until it succeeds.

    Transient errors are retried with backoff: an outage of any length is waited out, and
    the outcome of an attempt that already ran is not dropped. Only a cancellation (the
    worker is stopping) ends the retries: the try in flight finishes first, then
    CancelledError propagates so ARQ re-queues the job and the next attempt records an
    outcome. ``shielded=False`` says that ``write_once`` itself sees its try through when
    its caller is cancelled (the status writer's ``finish`` does), so the first try needs
    no shield and no task of its own.
    """
    if not shielded:
        # The usual case costs one call: the retry machinery starts at the first failure.
        try:
            return await write_once()
        except STATEMENT_ERRORS:
            raise
        except TRANSIENT_DB_ERRORS as error:
            first_error: Exception | None = error
    else:
        first_error = None
    stopping = asyncio.Event()
    pending = asyncio.ensure_future(
        _write_loop(
            write_once,
            first_error=first_error,
            task_id=task_id,
            what=what,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            stopping=stopping,
        )
    )
    try:
        return await asyncio.shield(pending)
    except asyncio.CancelledError:
        stopping.set()
        # Written or abandoned, the job must go back to ARQ: re-raise the cancellation.
        with contextlib.suppress(WriteAbandoned, *TRANSIENT_DB_ERRORS):
            await pending
        raise


async def _write_loop(
    write_once: Callable[[], Awaitable[T]],
    *,
    first_error: Exception | None,
    task_id: str,
    what: str,
    backoff_s: float,
    backoff_max_s: float,
    stopping: asyncio.Event,
) -> T:
    failed_tries = 0
    first_failure = 0.0
    delay_s = backoff_s
    # The failure of a try made before the loop started, if any: back off before the next.
    error = first_error
    while True:
        if error is None:
            try:
                written = await write_once()
            except STATEMENT_ERRORS:
                raise
            except TRANSIENT_DB_ERRORS as caught:
                error = caught
            else:
                if failed_tries:
                    log.info(
                        "task.write_recovered",
                        extra=fields(
                            task_id=task_id,
                            write=what,
                            failed_tries=failed_tries,
                            outage_s=round(time.monotonic() - first_failure, 3),
                        ),
                    )
                return written
        failed_tries += 1
        if failed_tries == 1:
            first_failure = time.monotonic()
            # One line when the outage starts and one when it ends, not one per try.
            log.warning(
                "task.write_failing",
                extra=fields(
                    task_id=task_id, write=what, retry_max_s=backoff_max_s, error=repr(error)
                ),
            )
        log.debug(
            "task.write_retry",
            extra=fields(task_id=task_id, write=what, failed_tries=failed_tries, delay_s=delay_s),
        )
        if not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=delay_s)
        if stopping.is_set():
            log.warning(
                "task.write_abandoned",
                extra=fields(
                    task_id=task_id,
                    write=what,
                    failed_tries=failed_tries,
                    reason="worker stopping: the job goes back to the queue",
                ),
            )
            raise WriteAbandoned(f"{what} for task {task_id} not written") from error
        delay_s = min(delay_s * 2, backoff_max_s)
        error = None
