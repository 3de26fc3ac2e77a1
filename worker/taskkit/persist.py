"""Database writes that must not be lost: retried until written.

``retry_until_written`` retries a one-try write, such as handing an outcome to the
worker's status writer (see worker.taskkit.status_writer), where it shares a transaction
with other jobs' writes. Every error is retried, not only an outage's: an outcome whose
write is given up on makes its task run again, and the errors that look permanent (a
REVOKE'd privilege, a read-only database, a full disk) end without a change to our code.
Delays come from ``throttler.retry.RESULT_WRITE``. The process's writes that are being
retried form one outage (``_FailingWrites``): one WARNING line as the first fails, one as
the last lands, DEBUG lines in between, however many jobs wait meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from throttler.logs import fields
from throttler.retry import RESULT_WRITE, Backoff, pause
from worker.taskkit.status_writer import StatusWriterClosed

log = logging.getLogger(__name__)
T = TypeVar("T")

# The writer itself has stopped (the worker is shutting down): no later try can land, so
# the job ends as it does when cancelled, and recovery takes the task from there.
_WRITER_GONE: tuple[type[Exception], ...] = (StatusWriterClosed,)


class WriteAbandoned(Exception):
    """The worker is stopping and the database never took the write."""


def _describe(error: BaseException) -> str:
    # SQLAlchemy's first line names the driver's error; the rest is the SQL.
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


class _FailingWrites:
    """The writes of this process that failed and are being retried, as one outage.

    When the database cannot write, every job's outcome fails together and each job
    retries its own: the first failure logs one WARNING (with its error), the last write
    to land logs one more (how long, how many writes and tries); tries in between log at
    DEBUG.
    """

    def __init__(self) -> None:
        self._retrying: set[object] = set()
        self._down_since: float | None = None
        self._writes = 0
        self._tries = 0

    def failed(self, write: object, error: BaseException, *, task_id: str, what: str) -> None:
        self._tries += 1
        if write not in self._retrying:
            self._retrying.add(write)
            self._writes += 1
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "task.write_failing",
                extra=fields(task_id=task_id, write=what, error=_describe(error)),
            )

    def ended(self, write: object, *, task_id: str, what: str, landed: bool) -> None:
        """A write that had failed is written (``landed``) or given up on."""
        if write not in self._retrying:
            return
        self._retrying.discard(write)
        if self._retrying or self._down_since is None:
            return
        if landed:
            log.warning(
                "task.write_recovered",
                extra=fields(
                    task_id=task_id,
                    write=what,
                    down_s=round(time.monotonic() - self._down_since, 3),
                    writes=self._writes,
                    failed_tries=self._tries,
                ),
            )
        self._down_since = None
        self._writes = self._tries = 0


_failing = _FailingWrites()


async def retry_until_written(
    write_once: Callable[[], Awaitable[T]],
    *,
    task_id: str,
    what: str,
    backoff: Backoff = RESULT_WRITE,
    shielded: bool = True,
) -> T:
    """Call ``write_once`` (one try, committed when it returns) until it succeeds.

    Any error is retried with backoff: an outage of any length, a revoked privilege or a
    full disk is waited out, and the outcome of an attempt that already ran is not
    dropped. Only a cancellation (the worker is stopping) or a closed status writer ends
    the retries: the try in flight finishes first, then CancelledError propagates. The task
    is still ``running`` on its dispatch: the job ARQ delivers again (or the reconciler)
    puts it back through the outbox, ``requeued`` (a side-effecting one ends ``failed``,
    outcome unknown). ``shielded=False`` says
    that ``write_once`` itself sees its try through when its caller is cancelled (the
    status writer's ``finish`` does), so the first try needs no shield and no task of its
    own.
    """
    if not shielded:
        # The usual case costs one call: the retry machinery starts at the first failure.
        try:
            return await write_once()
        except _WRITER_GONE:
            raise
        except Exception as error:
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
        # Written or abandoned, the cancellation is the job's end: re-raise it.
        with contextlib.suppress(Exception):
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
    write = object()  # this write, among the process's failing ones
    landed = False
    delays = backoff.delays()
    # The failure of a try made before the loop started, if any: back off before the next.
    error = first_error
    tries = 0
    try:
        while True:
            if error is None:
                try:
                    written = await write_once()
                except _WRITER_GONE:
                    raise
                except Exception as caught:
                    error = caught
                else:
                    landed = True
                    return written
            tries += 1
            _failing.failed(write, error, task_id=task_id, what=what)
            delay_s = next(delays)
            # Each try, with its count: tests and operators follow a long outage by these.
            log.debug(
                "task.write_retry",
                extra=fields(
                    task_id=task_id,
                    write=what,
                    failed_tries=tries,
                    delay_s=round(delay_s, 3),
                    error=_describe(error),
                ),
            )
            if await pause(delay_s, unless=stopping):
                log.warning(
                    "task.write_abandoned",
                    extra=fields(
                        task_id=task_id,
                        write=what,
                        failed_tries=tries,
                        reason="worker stopping: the job goes back to the queue",
                    ),
                )
                raise WriteAbandoned(f"{what} for task {task_id} not written") from error
            error = None
    finally:
        _failing.ended(write, task_id=task_id, what=what, landed=landed)
