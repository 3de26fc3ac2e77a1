"""The intake writer for SQLite: group commit on a thread with its own connection.

Through aiosqlite, each statement of a batch is a round trip from the event loop to the
driver's thread and back, and the way back waits behind every request the loop is busy
with (several ms at full load): a batch of BEGIN, three inserts and COMMIT took about
10 ms, most of it queueing, and a writer that commits one batch at a time cannot go
faster than its batches. Here the loop only queues a submission and awaits its future;
the thread takes every submission waiting, writes and commits them, hands the outcome
back to the loop in one callback, and goes straight on to the next batch.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError

from api.announce import NewWorkAnnouncer
from api.intake import DEFAULT_MAX_BATCH_TASKS, IntakeClosedError, IntakeWriter, Submission
from throttler.submit import NewTask, SQLiteRows, insert_rows_sqlite


@dataclass(frozen=True, kw_only=True, slots=True)
class _Queued:
    submission: Submission
    rows: SQLiteRows


class SQLiteIntakeWriter(IntakeWriter):
    """Writes submissions on its own thread; ``connect`` opens its sqlite3 connection."""

    def __init__(
        self,
        connect: Callable[[], sqlite3.Connection],
        *,
        announcer: NewWorkAnnouncer | None = None,
        max_batch_tasks: int = DEFAULT_MAX_BATCH_TASKS,
    ) -> None:
        super().__init__(announcer=announcer, max_batch_tasks=max_batch_tasks)
        self._connect = connect
        self._queue: queue.SimpleQueue[_Queued | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name="intake-writer", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._stopped is not None:
            await asyncio.shield(self._stopped)

    async def submit(self, tasks: Sequence[NewTask]) -> None:
        if self._closed or self._loop is None:
            raise IntakeClosedError("intake is closed")
        done: asyncio.Future[None] = self._loop.create_future()
        # Converted here, on the loop: the writer thread then needs the GIL only briefly.
        rows = SQLiteRows.of(tasks)
        self._queue.put(_Queued(submission=Submission(tasks=tasks, done=done), rows=rows))
        await done

    # --- on the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        assert self._loop is not None
        connection: sqlite3.Connection | None = None
        try:
            stopping = False
            while not stopping:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                size = len(first.submission.tasks)
                # Take only what is already waiting: no sleep to gather more.
                while size < self._max_batch_tasks:
                    try:
                        following = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if following is None:
                        stopping = True  # write what came before the stop, then end
                        break
                    batch.append(following)
                    size += len(following.submission.tasks)
                # A request whose client went away before its turn is not written at all.
                live = [queued for queued in batch if not queued.submission.done.cancelled()]
                if live:
                    connection, error = self._write(connection, [queued.rows for queued in live])
                    answered = [queued.submission for queued in live]
                    self._loop.call_soon_threadsafe(self._settle, answered, error)
        finally:
            if connection is not None:
                connection.close()
            # Nothing arrives once closed is set, but never leave a caller waiting.
            leftovers: list[Submission] = []
            while True:
                try:
                    leftover = self._queue.get_nowait()
                except queue.Empty:
                    break
                if leftover is not None:
                    leftovers.append(leftover.submission)
            self._loop.call_soon_threadsafe(self._finish, leftovers)

    def _write(
        self, connection: sqlite3.Connection | None, batch: Sequence[SQLiteRows]
    ) -> tuple[sqlite3.Connection | None, Exception | None]:
        """Commit the batch in one transaction; return the connection and any error."""
        try:
            if connection is None:
                connection = self._connect()  # again after a failed attempt
            # IMMEDIATE: take the write lock now, waiting up to busy_timeout for it.
            connection.execute("BEGIN IMMEDIATE")
            try:
                insert_rows_sqlite(connection, batch)
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
        except Exception as error:
            if connection is not None and connection.in_transaction:
                # Even ROLLBACK failed: start the next batch on a fresh connection.
                connection.close()
                connection = None
            if isinstance(error, sqlite3.Error):
                # As SQLAlchemy would raise it, so the API maps it like any other (503).
                return connection, DBAPIError.instance(None, None, error, sqlite3.Error)
            return connection, error
        return connection, None

    def _finish(self, leftovers: Sequence[Submission]) -> None:
        if leftovers:
            self._settle(leftovers, IntakeClosedError("intake is closed"))
        assert self._stopped is not None
        if not self._stopped.done():
            self._stopped.set_result(None)
