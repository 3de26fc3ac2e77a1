"""Database writes that must not be lost: retried until written.

``retry_until_written`` retries a one-try write, such as handing an outcome to the
worker's status writer (see worker.taskkit.status_writer), where it shares a transaction
with other jobs' writes. Delays come from ``throttler.retry.RESULT_WRITE``; an outage is
one WARNING line as it starts and one as it ends (``throttler.retry.Outage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from throttler.errors import STATEMENT_ERRORS, TRANSIENT_DB_ERRORS
from throttler.logs import fields
from throttler.retry import RESULT_WRITE, Backoff, Outage, pause

log = logging.getLogger(__name__)
T = TypeVar("T")


class WriteAbandoned(Exception):
    """The worker is stopping and the database never took the write."""


async def retry_until_written(
    write_once: Callable[[], Awaitable[T]],
    *,
    task_id: str,
    what: str,
    backoff: Backoff = RESULT_WRITE,
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
            backoff=backoff,
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
    backoff: Backoff,
    stopping: asyncio.Event,
) -> T:
    outage = Outage(
        log,
        down_event="task.write_failing",
        up_event="task.write_recovered",
        task_id=task_id,
        write=what,
    )
    delays = backoff.delays()
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
                outage.succeeded()
                return written
        delay_s = next(delays)
        outage.failed(error, retry_in_s=round(delay_s, 3))
        # Each try, with its count: tests and operators follow a long outage by these.
        log.debug(
            "task.write_retry",
            extra=fields(
                task_id=task_id, write=what, failed_tries=outage.failures, delay_s=delay_s
            ),
        )
        if await pause(delay_s, unless=stopping):
            log.warning(
                "task.write_abandoned",
                extra=fields(
                    task_id=task_id,
                    write=what,
                    failed_tries=outage.failures,
                    reason="worker stopping: the job goes back to the queue",
                ),
            )
            raise WriteAbandoned(f"{what} for task {task_id} not written") from error
        error = None
