"""Engine and session factory, with the SQLite settings a multi-process outbox needs, and
the PostgreSQL driver settings that PgBouncer's transaction pooling needs."""

from __future__ import annotations

import sqlite3
import time
from typing import Any, cast

from sqlalchemy import event
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry

from throttler.settings import Settings, sqlite_path

SessionFactory = async_sessionmaker[AsyncSession]
# Execution option naming the BEGIN statement SQLite transactions start with.
_SQLITE_BEGIN_OPTION = "sqlite_begin"
# The WAL is copied back into the database file (a checkpoint: two fsyncs, and each page
# written) by the commit that finds it past this many pages. SQLite's default, 1,000
# pages (4 MB), had every second claim of 1,000 tasks pay a checkpoint; at 10,000 (40 MB)
# a page changed by several transactions is written back once, and the relay drains
# ~12 % faster (python -m bench.relay). The WAL file stays that large on disk.
WAL_AUTOCHECKPOINT_PAGES = 10_000


def create_engine(settings: Settings) -> AsyncEngine:
    """Create the engine for ``DATABASE_URL``; the caller disposes of it."""
    if settings.is_sqlite:
        engine = create_async_engine(
            settings.database_url,
            connect_args={"timeout": settings.database_timeout_s},
        )
        _configure_sqlite(engine, settings)
        return engine
    engine = create_async_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        pool_timeout=settings.database_timeout_s,
        connect_args={
            "timeout": settings.database_timeout_s,
            "command_timeout": settings.database_timeout_s * 2,
            **pgbouncer_connect_args(settings),
        },
    )
    _ping_idle_connections(engine)
    return engine


# A connection checked out again within this long of its last use is not pinged first.
IDLE_PING_AFTER_S = 1.0
_LAST_USED = "throttler_last_used"


def _ping_idle_connections(engine: AsyncEngine) -> None:
    """Ping a connection at check-out only when it has sat idle in the pool.

    SQLAlchemy's ``pool_pre_ping`` pings at every check-out, and its asyncpg ping is three
    round trips (BEGIN, an empty statement, ROLLBACK, so that PgBouncer's transaction
    pooling can follow it): as many as a busy loop's whole transaction. A connection
    broken while idle (a server restart, an idle-session timeout, a cut) is still found
    and replaced before use; one broken within a second of its last use fails its
    statement instead, which every caller already retries as the database being away
    (throttler.errors).
    """
    pool = engine.sync_engine.pool
    dialect = engine.dialect

    @event.listens_for(pool, "connect")
    def _connected(_dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        record.info[_LAST_USED] = time.monotonic()

    @event.listens_for(pool, "checkin")
    def _returned(_dbapi_connection: DBAPIConnection | None, record: ConnectionPoolEntry) -> None:
        record.info[_LAST_USED] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _checked_out(
        dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry, _proxy: Any
    ) -> None:
        if time.monotonic() - record.info.get(_LAST_USED, 0.0) < IDLE_PING_AFTER_S:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as error:
            if dialect.is_disconnect(cast(Any, error), dbapi_connection, None):
                # The pool replaces the connection and checks out another.
                raise DisconnectionError(str(error)) from error
            raise


def pgbouncer_connect_args(settings: Settings) -> dict[str, Any]:
    """The driver arguments for DATABASE_PGBOUNCER (none without it: direct connections
    keep their prepared statement caches).

    In transaction pooling each transaction may run on another server connection, and
    PgBouncer before 1.21 does not follow named prepared statements there. SQLAlchemy's
    asyncpg dialect prepares every statement, then runs it; by default it keeps the
    prepared statements (its cache and asyncpg's), named ``__asyncpg_stmt_<n>__`` with
    ``n`` counted per process: a cached one reused in a later transaction "does not
    exist" on that server, and another process's same name "already exists". Without
    the caches every statement is prepared in the transaction that runs it, and unnamed:
    the unnamed statement lasts until the next one is prepared on that server connection,
    which is the statement's own transaction. (SQLAlchemy's docs suggest random names
    instead: named statements are never closed on the server connection they were made
    on, so they pile up there, over a hundred per server connection after 600 statements
    measured here.) The cost: one more round trip per statement.
    """
    if not settings.database_pgbouncer:
        return {}
    return {
        "statement_cache_size": 0,  # asyncpg's own cache
        "prepared_statement_cache_size": 0,  # SQLAlchemy's cache, per DBAPI connection
        "prepared_statement_name_func": _unnamed,
    }


def _unnamed() -> str:
    # asyncpg takes the empty name as PostgreSQL's unnamed statement.
    return ""


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions for units of work that write (on SQLite they take the write lock at BEGIN)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def create_read_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that only read: on SQLite they never wait for the write lock."""
    return async_sessionmaker(
        engine.execution_options(**{_SQLITE_BEGIN_OPTION: "BEGIN"}), expire_on_commit=False
    )


def connect_sqlite(settings: Settings) -> sqlite3.Connection:
    """Open a plain sqlite3 connection to DATABASE_URL's file, set up like the engine's.

    For a thread that writes on its own (throttler.store.sqlite_thread). As with the engine's
    connections, nothing begins implicitly: the caller issues ``BEGIN IMMEDIATE``.
    """
    path = sqlite_path(settings.database_url)
    if path is None:
        raise ValueError(f"not a SQLite URL: {settings.database_url!r}")
    connection = sqlite3.connect(path, timeout=settings.database_timeout_s)
    try:
        _set_up_sqlite(cast(DBAPIConnection, connection), settings)
    except BaseException:
        connection.close()
        raise
    return connection


def _set_up_sqlite(dbapi_connection: DBAPIConnection, settings: Settings) -> None:
    # Let the caller (SQLAlchemy, see _on_begin), not the driver, emit BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the single writer; api, relay and workers share the file.
    cursor.execute(f"PRAGMA busy_timeout={int(settings.database_timeout_s * 1000)}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={settings.sqlite_synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
    cursor.close()


def _configure_sqlite(engine: AsyncEngine, settings: Settings) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        _set_up_sqlite(dbapi_connection, settings)

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Take the write lock up front: a deferred transaction that later upgrades to a
        # writer fails at once with "database is locked" instead of waiting busy_timeout.
        # Read-only sessions (create_read_session_factory) use a plain deferred BEGIN.
        connection.exec_driver_sql(
            connection.get_execution_options().get(_SQLITE_BEGIN_OPTION, "BEGIN IMMEDIATE")
        )
