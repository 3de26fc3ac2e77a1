"""Database writes that must not be lost: one transaction each, retried until written."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    NotSupportedError,
    ProgrammingError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession

from throttler.db import SessionFactory
from throttler.logs import fields

log = logging.getLogger(__name__)

# Connection loss, lock timeouts, a full pool: worth another try after a pause.
TRANSIENT_DB_ERRORS: tuple[type[Exception], ...] = (DBAPIError, PoolTimeoutError, OSError)
# DBAPIError subclasses that say the statement itself is wrong: another try cannot help.
STATEMENT_ERRORS: tuple[type[Exception], ...] = (
    DataError,
    IntegrityError,
    NotSupportedError,
    ProgrammingError,
)
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
    """Run ``write`` in its own transaction, retrying transient errors until it is written.

    An outage of any length is waited out: the outcome of an attempt that already ran is
    not dropped. Only a cancellation (the worker is stopping) ends the retries: the try in
    flight finishes first, then CancelledError propagates so ARQ re-queues the job and the
    next attempt records an outcome.
    """
    stopping = asyncio.Event()
    pending = asyncio.ensure_future(
        _write_loop(
            write,
            sessions=sessions,
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
    write: Callable[[AsyncSession], Awaitable[bool]],
    *,
    sessions: SessionFactory,
    task_id: str,
    what: str,
    backoff_s: float,
    backoff_max_s: float,
    stopping: asyncio.Event,
) -> bool:
    failed_tries = 0
    first_failure = 0.0
    delay_s = backoff_s
    while True:
        try:
            async with sessions.begin() as session:
                written = await write(session)
        except STATEMENT_ERRORS:
            raise
        except TRANSIENT_DB_ERRORS as error:
            failed_tries += 1
            if failed_tries == 1:
                first_failure = time.monotonic()
                # One line when the outage starts and one when it ends, not one per try.
                log.warning(
                    "task.write_failing",
                    extra=fields(
                        task_id=task_id,
                        write=what,
                        retry_max_s=backoff_max_s,
                        error=repr(error),
                    ),
                )
            log.debug(
                "task.write_retry",
                extra=fields(
                    task_id=task_id, write=what, failed_tries=failed_tries, delay_s=delay_s
                ),
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
            continue
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
