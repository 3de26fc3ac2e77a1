"""The intake writer for PostgreSQL: group commit through SQLAlchemy sessions on the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from api.announce import NewWorkAnnouncer
from api.intake import DEFAULT_MAX_BATCH_TASKS, IntakeClosedError, IntakeWriter, Submission
from throttler.db import SessionFactory
from throttler.submit import NewTask, submit_tasks


class SessionIntakeWriter(IntakeWriter):
    """One asyncio task takes every waiting submission and writes them in one session."""

    def __init__(
        self,
        sessions: SessionFactory,
        *,
        announcer: NewWorkAnnouncer | None = None,
        max_batch_tasks: int = DEFAULT_MAX_BATCH_TASKS,
    ) -> None:
        super().__init__(announcer=announcer, max_batch_tasks=max_batch_tasks)
        self._sessions = sessions
        self._queue: asyncio.Queue[Submission | None] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="intake-writer")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        if self._runner is not None:
            await self._runner

    async def submit(self, tasks: Sequence[NewTask]) -> None:
        if self._closed or self._runner is None:
            raise IntakeClosedError("intake is closed")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Submission(tasks=tasks, done=done))
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

    async def _write(self, batch: list[Submission]) -> None:
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
            self._settle(live, error)
            return
        except BaseException as error:
            # Cancelled mid-write: whether it committed is unknown, so no request may say 202.
            self._settle(live, IntakeClosedError(str(error) or "cancelled"))
            raise
        self._settle(live, None)
