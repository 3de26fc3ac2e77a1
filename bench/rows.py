"""Fill a migrated SQLite file fast: a pending backlog, or a history of finished tasks.

Plain ``sqlite3`` in one transaction, laid out as the models store rows (UTC text
timestamps, JSON text): the benchmarks need 50,000 pending or 1,000,000 finished tasks
in seconds, which neither the API nor the ORM would give.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

# How the models' UTCDateTime lands in SQLite (naive UTC text).
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"
BUSY_TIMEOUT_S = 30.0


def sqlite_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(_SQLITE_TIME)


def connect(path: Path) -> sqlite3.Connection:
    """A connection that waits for the write lock other processes hold, as ours do."""
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    return connection


def fill_backlog(path: Path, *, count: int, name: str = "greeting", accounts: int = 1) -> None:
    """Commit ``count`` pending tasks with their outbox rows and ``submitted`` events.

    One transaction, as a bulk submission would; created_at increases by a microsecond
    per task so their order is the submission order.
    """
    start = datetime.now(UTC)
    tasks = []
    for index in range(count):
        task_id = str(uuid.uuid4())
        account = f"account-{index % accounts}" if accounts > 1 else "default"
        at = sqlite_time(start + timedelta(microseconds=index))
        tasks.append((task_id, name, account, f'{{"name": "n{index}"}}', at))
    connection = connect(path)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO tasks (id, name, account, payload, status, priority, attempts, "
            "created_at) VALUES (?, ?, ?, ?, 'pending', 5, 0, ?)",
            tasks,
        )
        connection.executemany(
            "INSERT INTO outbox (task_id, created_at) VALUES (?, ?)",
            [(task[0], task[4]) for task in tasks],
        )
        connection.executemany(
            "INSERT INTO task_events (task_id, at, event, detail) VALUES (?, ?, 'submitted', ?)",
            [(task[0], task[4], f'{{"account": "{task[2]}"}}') for task in tasks],
        )
        connection.execute("COMMIT")
    finally:
        connection.close()


_FINISHED_TASKS = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count)
INSERT INTO tasks (id, name, account, payload, status, priority, attempts, result,
                   created_at, queued_at, started_at, finished_at)
SELECT printf('%08x-0000-4000-8000-%012x', i, i), 'greeting', 'account-' || (i % 100),
       '{"name": "old"}', 'succeeded', 5, 1, '{"message": "Hello, old!"}',
       :at, :at, :at, :at
FROM n
"""
_FINISHED_EVENTS = """
INSERT INTO task_events (task_id, at, event, detail)
SELECT id, :at, kind.event, kind.detail FROM tasks
CROSS JOIN (SELECT 'submitted' AS event, '{"account": "a"}' AS detail
            UNION ALL SELECT 'queued', '{"relay": "r"}'
            UNION ALL SELECT 'started', '{"attempt": 1, "worker": "w"}'
            UNION ALL SELECT 'succeeded', '{"attempt": 1, "worker": "w"}') AS kind
WHERE tasks.status = 'succeeded'
"""


@contextmanager
def unindexed_sqlite(path: Path, tables: Sequence[str]) -> Iterator[sqlite3.Connection]:
    """A connection to the SQLite file ``path`` for filling ``tables`` in one transaction.

    Their secondary indexes are dropped first and built again after, and there is no
    journal meanwhile: a fresh benchmark file, nobody else has it open, and a million
    rows take seconds rather than a minute.
    """
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA cache_size=-500000")
        indexes = connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' "
            "AND tbl_name IN (SELECT value FROM json_each(?)) AND sql IS NOT NULL",
            [json.dumps(list(tables))],
        ).fetchall()
        connection.execute("BEGIN")
        for name, _ in indexes:
            connection.execute(f'DROP INDEX "{name}"')
        yield connection
        for _, sql in indexes:
            connection.execute(sql)
        connection.execute("COMMIT")
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


def fill_finished(path: Path, *, count: int) -> None:
    """Add ``count`` succeeded tasks a day old, each with its four events, generated
    inside SQLite (a recursive CTE)."""
    at = sqlite_time(datetime.now(UTC) - timedelta(days=1))
    with unindexed_sqlite(path, ("tasks", "task_events")) as connection:
        connection.execute(_FINISHED_TASKS, {"count": count, "at": at})
        connection.execute(_FINISHED_EVENTS, {"at": at})
