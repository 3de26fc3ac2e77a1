"""Whether a write would succeed now: what /readyz reports for the database.

``SELECT 1`` says the database answers, not that it takes writes: a SQLite file locked
by another process or on a full or read-only file system, a PostgreSQL standby, a
database set read-only or a role whose INSERT was revoked all answer it, and every
submission then fails. Each check here asks what a write needs, without writing:

- SQLite: the file system is writable and has room (``statvfs``: the read-only flag,
  and ``MIN_FREE_BYTES`` free), and the write lock can be taken now (``BEGIN IMMEDIATE``
  then ``ROLLBACK`` on a connection of its own, waiting as a write would, for
  ``DATABASE_TIMEOUT_S``, but at most ``MAX_LOCK_WAIT_S``). A
  rolled-back write would not do for a full disk: in WAL mode nothing reaches the disk
  before COMMIT, so only the free space can tell, and a threshold is a judgement: below
  1 MiB the next commits (their pages in the WAL) may not fit.
- PostgreSQL: the session is not read-only (``transaction_read_only``: a standby, or
  ``default_transaction_read_only``) and the role holds every privilege the writes use
  (``has_table_privilege``, ``has_sequence_privilege``), in one statement. A full disk
  on the server is not visible from here: writes then fail with SQLSTATE 53100, which
  the API answers with 503 (throttler.errors).

Probes are polled, so a result is kept for ``CACHE_S`` and concurrent probes share the
one check in flight.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.models import OutboxEntry, Task, TaskEvent
from throttler.settings import Settings, sqlite_path

# Below this much free space on the SQLite file's file system, the next commits may fail.
MIN_FREE_BYTES = 1 << 20
# The longest the SQLite check waits for the write lock (a write waits DATABASE_TIMEOUT_S):
# well within the probe's own timeout (api.routes.health); commits elsewhere take
# milliseconds, so a lock not free within this means writers are stuck behind a holder.
MAX_LOCK_WAIT_S = 1.0
# How long one result stands: probes come every few seconds, often from several callers.
CACHE_S = 1.0


class WriteCheck(Protocol):
    async def blocker(self) -> str | None:
        """None if a write would succeed now, else why not (one line)."""
        ...


def _describe(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:200]


class SqliteWriteCheck:
    """Room on the file system and the write lock, on a connection of its own."""

    def __init__(self, path: Path, *, lock_wait_s: float) -> None:
        self._path = path
        self._lock_wait_s = lock_wait_s

    async def blocker(self) -> str | None:
        return await asyncio.to_thread(self._blocker)

    def _blocker(self) -> str | None:
        try:
            stats = os.statvfs(self._path.parent)
        except OSError as error:
            return _describe(error)
        if stats.f_flag & os.ST_RDONLY:
            return "read-only file system"
        free = stats.f_bavail * stats.f_frsize
        if free < MIN_FREE_BYTES:
            return f"disk full: {free} bytes free"
        try:
            # mode=rw: never create the file; isolation_level=None: BEGIN is ours.
            connection = sqlite3.connect(
                f"{self._path.resolve().as_uri()}?mode=rw",
                uri=True,
                timeout=self._lock_wait_s,
                isolation_level=None,
            )
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.execute("ROLLBACK")
            finally:
                connection.close()
        except sqlite3.Error as error:
            return _describe(error)
        return None


_TABLE_PRIVILEGES = (
    (Task.__tablename__, ("INSERT", "UPDATE")),
    (OutboxEntry.__tablename__, ("INSERT", "UPDATE", "DELETE")),
    (TaskEvent.__tablename__, ("INSERT",)),
)
# Tables whose ids come from a sequence (BIGSERIAL): an INSERT also needs USAGE on it.
_SERIAL_TABLES = (OutboxEntry.__tablename__, TaskEvent.__tablename__)


def _postgres_query() -> str:
    # has_table_privilege('t', 'INSERT, UPDATE') is true if ANY is held: one per privilege.
    columns = ["current_setting('transaction_read_only') = 'on' AS read_only"]
    columns += [
        f"has_table_privilege('{table}', '{privilege}') AS \"{privilege} on {table}\""
        for table, privileges in _TABLE_PRIVILEGES
        for privilege in privileges
    ]
    columns += [
        f"has_sequence_privilege(pg_get_serial_sequence('{table}', 'id'), 'USAGE')"
        f' AS "USAGE on the {table} id sequence"'
        for table in _SERIAL_TABLES
    ]
    return "SELECT " + ", ".join(columns)


class PostgresWriteCheck:
    """Read-only session and the privileges the writes use, in one statement."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._query = text(_postgres_query())

    async def blocker(self) -> str | None:
        async with self._engine.connect() as connection:
            row = (await connection.execute(self._query)).mappings().one()
        if row["read_only"]:
            return "database is read-only (standby, or default_transaction_read_only)"
        missing = [name for name, held in row.items() if name != "read_only" and not held]
        if missing:
            return "no privilege: " + ", ".join(missing)
        return None


class CachedWriteCheck:
    """A check's result kept for ``ttl_s``; concurrent callers share the check in flight."""

    def __init__(self, check: WriteCheck, *, ttl_s: float = CACHE_S) -> None:
        self._check = check
        self._ttl_s = ttl_s
        self._result: tuple[float, str | None] | None = None
        self._running: asyncio.Task[str | None] | None = None

    async def blocker(self) -> str | None:
        if self._result is not None and time.monotonic() - self._result[0] < self._ttl_s:
            return self._result[1]
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._run())
        # Shielded: one caller timing out must not cancel the check the others await.
        return await asyncio.shield(self._running)

    async def _run(self) -> str | None:
        try:
            reason = await self._check.blocker()
        except Exception as error:
            reason = _describe(error)
        self._result = (time.monotonic(), reason)
        return reason


def open_write_check(settings: Settings, engine: AsyncEngine) -> WriteCheck:
    """The check for ``DATABASE_URL``'s database, cached."""
    path = sqlite_path(settings.database_url)
    check: WriteCheck
    if path is None:
        check = PostgresWriteCheck(engine)
    else:
        lock_wait_s = min(settings.database_timeout_s, MAX_LOCK_WAIT_S)
        check = SqliteWriteCheck(path, lock_wait_s=lock_wait_s)
    return CachedWriteCheck(check)
