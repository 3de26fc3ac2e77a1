"""Group commit: one writer per API process turns concurrent submissions into one transaction.

A submit endpoint validates its request, hands the rows to ``IntakeWriter.submit`` and
awaits the outcome. The writer takes every submission waiting at that moment (up to
``max_batch_tasks`` rows), inserts them all with one statement per table in ONE
transaction, commits, and only then resolves each submission's future. Requests that
arrive while a commit runs queue up and form the next batch, so an idle server adds no
latency and a busy one shares each BEGIN/COMMIT (and its fsync) among many requests.

A failed batch sets its error on every submission in it: nothing of the batch is
committed, and each request answers as if its own transaction had failed (a 503 for a
database that cannot take the write). A 202 is only ever sent after the commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from throttler.db import SessionFactory
from throttler.logs import fields
from throttler.outbox import NewTask, submit_tasks

log = logging.getLogger(__name__)

# Rows per transaction: large enough to amortize BEGIN/COMMIT under any load, small
# enough that one batch's statements stay well within driver and SQLite limits.
DEFAULT_MAX_BATCH_TASKS = 500


class IntakeClosedError(RuntimeError):
    """The writer has stopped (the API is shutting down); the submission was not written."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Submission:
    tasks: Sequence[NewTask]
    done: asyncio.Future[None]


class IntakeWriter:
    """The API process's single writer of new tasks; the app lifespan starts and closes it."""

    def __init__(
        self, sessions: SessionFactory, *, max_batch_tasks: int = DEFAULT_MAX_BATCH_TASKS
    ) -> None:
        self._sessions = sessions
        self._max_batch_tasks = max_batch_tasks
        self._queue: asyncio.Queue[_Submission | None] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        """Start the writer task on the running loop."""
        self._runner = asyncio.create_task(self._run(), name="intake-writer")

    async def close(self) -> None:
        """Refuse new submissions, write every one already queued, then stop."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        if self._runner is not None:
            await self._runner

    async def submit(self, tasks: Sequence[NewTask]) -> None:
        """Write ``tasks`` atomically (never split across transactions); return once committed.

        Raises the batch's database error when the transaction fails.
        """
        if self._closed or self._runner is None:
            raise IntakeClosedError("intake is closed")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Submission(tasks=tasks, done=done))
        await done

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            size = len(first.tasks)
            # Take only what is already waiting: no sleep to gather more.
            while size < self._max_batch_tasks and not self._queue.empty():
                following = self._queue.get_nowait()
                if following is None:
                    stopping = True  # write what came before the stop, then end
                    break
                batch.append(following)
                size += len(following.tasks)
            await self._write(batch)
        # Anything that slipped in after the stop marker (not possible once closed is set,
        # but never leave a caller waiting forever).
        while not self._queue.empty():
            leftover = self._queue.get_nowait()
            if leftover is not None and not leftover.done.done():
                leftover.done.set_exception(IntakeClosedError("intake is closed"))

    async def _write(self, batch: list[_Submission]) -> None:
        # A request whose client went away before its turn is not written at all.
        live = [submission for submission in batch if not submission.done.cancelled()]
        if not live:
            return
        try:
            async with self._sessions.begin() as session:
                await submit_tasks(
                    session, [task for submission in live for task in submission.tasks]
                )
        except Exception as error:
            log.warning(
                "intake.batch_failed",
                extra=fields(requests=len(live), tasks=sum(len(s.tasks) for s in live)),
            )
            for submission in live:
                if not submission.done.done():
                    submission.done.set_exception(error)
            return
        except BaseException as error:
            # Cancelled mid-write: whether it committed is unknown, so no request may say 202.
            for submission in live:
                if not submission.done.done():
                    submission.done.set_exception(IntakeClosedError(str(error) or "cancelled"))
            raise
        for submission in live:
            if not submission.done.done():
                submission.done.set_result(None)
