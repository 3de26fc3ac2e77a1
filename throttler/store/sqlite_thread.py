"""A thread of its own with a plain ``sqlite3`` connection: where SQLite's fast paths run.

Through aiosqlite every statement is a round trip from the event loop to the driver's
thread and back, and the way back waits behind whatever the loop is busy with (0.1 to
several ms under load): a transaction of five statements cost five such waits. Here a
whole transaction is one hop: the loop hands a function to the thread, the thread runs
BEGIN IMMEDIATE, the function and COMMIT on its own connection, and the loop gets the
outcome in one callback. The statements' CPU also leaves the event loop.

The connection is set up like the engine's (``throttler.db.connect_sqlite``) and used only
by this thread (a sqlite3 connection may only be closed by the thread that opened it).
Errors come out as SQLAlchemy's (``OperationalError`` for a locked database,
``IntegrityError``...), so callers classify them as they do any database error.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

from throttler.db import connect_sqlite
from throttler.settings import Settings

T = TypeVar("T")


class SQLiteThread:
    """Runs transactions, one at a time, on a dedicated thread and connection."""

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        connect: Callable[[], sqlite3.Connection] | None = None,
    ) -> None:
        self._connect = connect if connect is not None else lambda: connect_sqlite(settings)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._connection: sqlite3.Connection | None = None
        self._used = False
        self._closed = False

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one transaction on the thread; return its result once committed."""
        self._used = True
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._transaction, work)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._used:  # else there is no thread, nor a connection, to close
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=True)

    # --- on the thread ---------------------------------------------------------------------

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        statement = "BEGIN IMMEDIATE"
        try:
            if self._connection is None:
                self._connection = self._connect()  # again after a failed transaction
            connection = self._connection
            # IMMEDIATE: take the write lock now, waiting up to busy_timeout for it.
            connection.execute(statement)
            try:
                statement = getattr(work, "__name__", "work")
                result = work(connection)
                statement = "COMMIT"
                connection.execute(statement)
            except BaseException:
                self._rollback(connection)
                raise
        except sqlite3.Error as error:
            if isinstance(error, sqlite3.OperationalError | sqlite3.InterfaceError):
                # A connection that failed mid-transaction is not trusted again.
                self._close()
            # As SQLAlchemy raises it, so that callers map it like any other.
            raise DBAPIError.instance(statement, None, error, sqlite3.Error) from error
        return result

    def _rollback(self, connection: sqlite3.Connection) -> None:
        try:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
        except sqlite3.Error:
            # Even ROLLBACK failed: the next transaction starts on a fresh connection.
            self._close()

    def _close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.close()
