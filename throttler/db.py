"""Engine and session factory, with the SQLite settings a multi-process outbox needs."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry

from throttler.settings import Settings

SessionFactory = async_sessionmaker[AsyncSession]
# Execution option naming the BEGIN statement SQLite transactions start with.
_SQLITE_BEGIN_OPTION = "sqlite_begin"


def create_engine(settings: Settings) -> AsyncEngine:
    """Create the engine for ``DATABASE_URL``; the caller disposes of it."""
    if settings.is_sqlite:
        engine = create_async_engine(
            settings.database_url,
            connect_args={"timeout": settings.database_timeout_s},
        )
        _configure_sqlite(engine, settings)
        return engine
    return create_async_engine(
        settings.database_url,
        pool_size=settings.database_pool_size,
        pool_pre_ping=True,
        pool_timeout=settings.database_timeout_s,
        connect_args={
            "timeout": settings.database_timeout_s,
            "command_timeout": settings.database_timeout_s * 2,
        },
    )


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions for units of work that write (on SQLite they take the write lock at BEGIN)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def create_read_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that only read: on SQLite they never wait for the write lock."""
    return async_sessionmaker(
        engine.execution_options(**{_SQLITE_BEGIN_OPTION: "BEGIN"}), expire_on_commit=False
    )


def _configure_sqlite(engine: AsyncEngine, settings: Settings) -> None:
    busy_timeout_ms = int(settings.database_timeout_s * 1000)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy, not the driver, emit BEGIN (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL lets readers run beside the single writer; api, relay and workers share the file.
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={settings.sqlite_synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Take the write lock up front: a deferred transaction that later upgrades to a
        # writer fails at once with "database is locked" instead of waiting busy_timeout.
        # Read-only sessions (create_read_session_factory) use a plain deferred BEGIN.
        connection.exec_driver_sql(
            connection.get_execution_options().get(_SQLITE_BEGIN_OPTION, "BEGIN IMMEDIATE")
        )
