"""Fill a migrated database with a history of finished tasks, set-based, in seconds.

One ``INSERT ... SELECT`` generates every row inside the database (a recursive CTE on
SQLite, ``generate_series`` on PostgreSQL) with the secondary indexes dropped and built
again afterwards: a million rows go in in seconds, where the API or the ORM would take
many minutes. The rows are laid out as the models store them (SQLite: UTC text
timestamps with six fractional digits, JSON text), so the API reads them as its own.

The mix (the same on both databases, from a multiplicative hash of the row number):
accounts ``account-0`` … ``account-3`` hold 40 %, 30 %, 20 % and 10 % of the tasks; names
60 % greeting, 25 % download, 10 % non-blocking, 5 % blocking; statuses 85 % succeeded,
10 % failed, 5 % cancelled; created one after another over the last 30 days, oldest
first, each queued, started and finished some milliseconds later (a cancelled one never
started). No events: the task list reads only ``tasks``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.rows import unindexed_sqlite

ACCOUNTS = ("account-0", "account-1", "account-2", "account-3")
SPAN = timedelta(days=30)

# Every expression below is over ``i`` (the row number, oldest first), ``h`` (a hash of
# it, to spread the mix evenly) and ``us`` (its creation moment in µs since the epoch).
_ACCOUNT = (
    "CASE WHEN h % 10 < 4 THEN 'account-0' WHEN h % 10 < 7 THEN 'account-1' "
    "WHEN h % 10 < 9 THEN 'account-2' ELSE 'account-3' END"
)
_NAME = (
    "CASE WHEN (h / 10) % 20 < 12 THEN 'greeting' WHEN (h / 10) % 20 < 17 THEN 'download' "
    "WHEN (h / 10) % 20 < 19 THEN 'non_blocking_long_running_task' "
    "ELSE 'blocking_long_running_task' END"
)
_STATUS = (
    "CASE WHEN (h / 200) % 100 < 85 THEN 'succeeded' WHEN (h / 200) % 100 < 95 THEN 'failed' "
    "ELSE 'cancelled' END"
)
_COLUMNS = (
    "id, name, account, payload, host, status, priority, attempts, result, error, "
    "created_at, queued_at, started_at, finished_at"
)
# A multiplicative hash (Knuth's) of the row number, in 32 bits.
_HASH = "(i * 2654435761) % 4294967296"

_SQLITE = """
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :count - 1),
mix AS (SELECT i, {hash} AS h, :first_us + i * :step_us AS us FROM n),
task AS (SELECT i, us, {account} AS account, {name} AS name, {status} AS status FROM mix)
INSERT INTO tasks ({columns})
SELECT printf('%08x-0000-7000-8000-%012x', us / 1000000, i), name, account,
       CASE name WHEN 'download' THEN '{{"url": "https://example.com/' || i || '"}}'
                 WHEN 'greeting' THEN '{{"name": "n' || i || '"}}'
                 ELSE '{{"duration": 1}}' END,
       CASE name WHEN 'download' THEN 'example.com' END,
       status, 5, CASE status WHEN 'failed' THEN 5 WHEN 'cancelled' THEN 0 ELSE 1 END,
       CASE status WHEN 'succeeded' THEN '{{"message": "Hello, n' || i || '!"}}' END,
       CASE status WHEN 'failed' THEN 'RuntimeError: upstream said no' END,
       {at0}, CASE WHEN status != 'cancelled' THEN {at5} END,
       CASE WHEN status != 'cancelled' THEN {at10} END, {at50}
FROM task
"""

_POSTGRES = """
INSERT INTO tasks ({columns})
SELECT lpad(to_hex(us / 1000000), 8, '0') || '-0000-7000-8000-' || lpad(to_hex(i), 12, '0'),
       name, account,
       CAST(CASE name WHEN 'download' THEN '{{"url": "https://example.com/' || i || '"}}'
                      WHEN 'greeting' THEN '{{"name": "n' || i || '"}}'
                      ELSE '{{"duration": 1}}' END AS jsonb),
       CASE name WHEN 'download' THEN 'example.com' END,
       status, 5, CASE status WHEN 'failed' THEN 5 WHEN 'cancelled' THEN 0 ELSE 1 END,
       CAST(CASE status WHEN 'succeeded' THEN '{{"message": "Hello, n' || i || '!"}}' END
            AS jsonb),
       CASE status WHEN 'failed' THEN 'RuntimeError: upstream said no' END,
       {at0}, CASE WHEN status != 'cancelled' THEN {at5} END,
       CASE WHEN status != 'cancelled' THEN {at10} END, {at50}
FROM (
    SELECT i, us, {account} AS account, {name} AS name, {status} AS status
    FROM (
        SELECT i, {hash} AS h, CAST(:first_us AS bigint) + i * CAST(:step_us AS bigint) AS us
        FROM generate_series(CAST(0 AS bigint), CAST(:count AS bigint) - 1) AS i
    ) AS mix
) AS task
"""


def _sqlite_at(offset_ms: int) -> str:
    # The models' SQLite layout: "YYYY-MM-DD HH:MM:SS.ffffff", naive UTC.
    at = f"(us + {offset_ms * 1000})"
    return (
        f"strftime('%Y-%m-%d %H:%M:%S', {at} / 1000000, 'unixepoch') "
        f"|| '.' || printf('%06d', {at} % 1000000)"
    )


def _postgres_at(offset_ms: int) -> str:
    epoch = "TIMESTAMPTZ '1970-01-01 00:00:00+00'"
    return f"{epoch} + (us + {offset_ms * 1000}) * INTERVAL '1 microsecond'"


def _statement(template: str) -> str:
    moment = _sqlite_at if template is _SQLITE else _postgres_at
    return template.format(
        columns=_COLUMNS,
        hash=_HASH,
        account=_ACCOUNT,
        name=_NAME,
        status=_STATUS,
        at0=moment(0),
        at5=moment(5),
        at10=moment(10),
        at50=moment(50),
    )


def _moments(count: int, *, now: datetime) -> dict[str, int]:
    """The first task's creation (µs since the epoch) and the step between tasks."""
    step_us = max(1, int(SPAN.total_seconds() * 1_000_000) // max(count, 1))
    first = now - SPAN
    first_us = int(first.timestamp()) * 1_000_000 + first.microsecond
    return {"count": count, "first_us": first_us, "step_us": step_us}


def fill_sqlite(path: Path, *, count: int) -> None:
    """Add ``count`` finished tasks to the migrated SQLite file ``path``."""
    with unindexed_sqlite(path, ("tasks",)) as connection:
        connection.execute(_statement(_SQLITE), _moments(count, now=datetime.now(UTC)))


async def _fill_postgres(url: str, *, count: int) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
            # Every index but the primary key's (a constraint), built again after the rows.
            indexes = (
                await connection.execute(
                    text(
                        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'tasks' "
                        "AND indexname NOT IN (SELECT conname FROM pg_constraint)"
                    )
                )
            ).all()
            for name, _ in indexes:
                await connection.execute(text(f'DROP INDEX "{name}"'))
            await connection.execute(
                text(_statement(_POSTGRES)), _moments(count, now=datetime.now(UTC))
            )
            for _, definition in indexes:
                await connection.execute(text(definition))
        # Planner statistics, as autovacuum would gather soon after such a load.
        async with engine.begin() as connection:
            await connection.execute(text("ANALYZE tasks"))
    finally:
        await engine.dispose()


def fill_postgres(url: str, *, count: int) -> None:
    """Add ``count`` finished tasks to the migrated PostgreSQL database at ``url``."""
    asyncio.run(_fill_postgres(url, count=count))
