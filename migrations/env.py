"""Alembic environment: async engine, URL from the settings unless the caller sets one."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from throttler.db import pgbouncer_connect_args
from throttler.models import Base
from throttler.settings import load_settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    # Tests and tools pass a URL explicitly; processes read DATABASE_URL via settings.
    explicit = config.get_main_option("sqlalchemy.url")
    return explicit or load_settings().database_url


def _connect_args() -> dict[str, Any]:
    # Through PgBouncer (DATABASE_PGBOUNCER) as the services connect; an explicit URL
    # is a direct connection.
    if config.get_main_option("sqlalchemy.url"):
        return {}
    return pgbouncer_connect_args(load_settings())


def _run(connection: Connection) -> None:
    if connection.dialect.name == "sqlite":
        # Batch mode copies a table and renames the copy into place; SQLite (3.26+) refuses
        # that rename while a view (the audit_ views of 0009) names the table, unless the
        # rename works as before 3.26, leaving views as they are (they name the table, which
        # exists again once the copy is renamed).
        connection.exec_driver_sql("PRAGMA legacy_alter_table = ON")
        # A connection setting, not a change: end the transaction it began, so that the
        # migrations' own transaction below is the one that commits.
        connection.commit()
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(_database_url(), connect_args=_connect_args())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
