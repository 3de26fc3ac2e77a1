"""The status writer's batch on SQLite: throttler.lifecycle's statements, in plain ``sqlite3``.

Through SQLAlchemy a batch of ten writes cost about three times the CPU of the same
statements on the driver (statement set-up, bind processing, result wrapping), and on a
worker that CPU is taken from ARQ's own loop. So on SQLite the writer thread runs the same
transaction as ``start_attempts`` + ``record_outcomes`` here, with values stored exactly as
SQLAlchemy stores them (``models.UTCDateTime`` as naive UTC text with microseconds, JSON as
``json.dumps`` text). Both forms are checked against each other in
tests/integration/test_worker_status_writer.py.

Errors come out as SQLAlchemy's (``OperationalError`` for a locked or missing database,
``IntegrityError``, ...), so callers classify them as they do any database error.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import DBAPIError

from throttler.db import connect_sqlite
from throttler.lifecycle import Attempt, Outcome
from throttler.settings import Settings, sqlite_path
from throttler.statuses import TERMINAL_STATUSES, EventKind, TaskStatus

_NOT_TERMINAL = "status NOT IN ({})".format(
    ", ".join(f"'{status.value}'" for status in sorted(TERMINAL_STATUSES))
)
_INSERT_EVENT = "INSERT INTO task_events (task_id, at, event, detail) VALUES (?, ?, ?, ?)"
# One statement per shape of outcome, as throttler.lifecycle.Outcome.values() sets them.
_UPDATE = {
    EventKind.SUCCEEDED: "UPDATE tasks SET status = ?, error = ?, result = ?, finished_at = ? "
    "WHERE id = ?",
    EventKind.FAILED: "UPDATE tasks SET status = ?, error = ?, finished_at = ? WHERE id = ?",
    EventKind.RETRYING: "UPDATE tasks SET status = ?, error = ? WHERE id = ?",
}


def stored_time(moment: datetime) -> str:
    """A timestamp as SQLAlchemy's SQLite DateTime stores models.UTCDateTime values."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


class SqliteBatches:
    """One ``sqlite3`` connection, used only by the thread that runs ``write``."""

    def __init__(self, settings: Settings) -> None:
        if sqlite_path(settings.database_url) is None:
            raise ValueError("SqliteBatches needs a sqlite+aiosqlite:/// DATABASE_URL")
        self._settings = settings
        self._connection: sqlite3.Connection | None = None

    def write(
        self, *, starts: Sequence[str], outcomes: Sequence[Outcome], worker_id: str, now: datetime
    ) -> tuple[dict[str, Attempt], set[str]]:
        """Run the batch in one transaction; the same results as throttler.lifecycle's."""
        statement = "BEGIN IMMEDIATE"
        try:
            connection = self._connect()
            connection.execute(statement)
            try:
                statement = "start"
                started = self._start(connection, task_ids=starts, worker_id=worker_id, now=now)
                statement = "outcomes"
                finished = self._record(connection, outcomes)
                statement = "COMMIT"
                connection.execute(statement)
            except BaseException:
                _rollback(connection)
                raise
        except sqlite3.Error as error:
            if isinstance(error, sqlite3.OperationalError | sqlite3.InterfaceError):
                # A connection that failed mid-transaction is not trusted again.
                self.close()
            raise DBAPIError.instance(statement, None, error, sqlite3.Error) from error
        return started, finished

    def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.close()

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            # Set up like throttler.db's engines (pragmas, no implicit BEGIN), same file.
            self._connection = connect_sqlite(self._settings)
        return self._connection

    def _start(
        self,
        connection: sqlite3.Connection,
        *,
        task_ids: Sequence[str],
        worker_id: str,
        now: datetime,
    ) -> dict[str, Attempt]:
        if not task_ids:
            return {}
        at = stored_time(now)
        marks = ", ".join("?" * len(task_ids))
        rows = connection.execute(
            # Only placeholders and the constant status list are formatted in.
            f"UPDATE tasks SET status = ?, attempts = attempts + 1, started_at = ? "  # noqa: S608
            f"WHERE id IN ({marks}) AND {_NOT_TERMINAL} "
            "RETURNING id, name, payload, attempts",
            [TaskStatus.RUNNING.value, at, *task_ids],
        ).fetchall()
        attempts = {
            task_id: Attempt(
                task_id=task_id, name=name, payload=json.loads(payload), attempt=attempt
            )
            for task_id, name, payload, attempt in rows
        }
        connection.executemany(
            _INSERT_EVENT,
            [
                (
                    attempt.task_id,
                    at,
                    EventKind.STARTED.value,
                    json.dumps({"attempt": attempt.attempt, "worker": worker_id}),
                )
                for attempt in attempts.values()
            ],
        )
        return attempts

    def _record(self, connection: sqlite3.Connection, outcomes: Sequence[Outcome]) -> set[str]:
        if not outcomes:
            return set()
        ids = [outcome.task_id for outcome in outcomes]
        if len(set(ids)) != len(ids):
            raise ValueError("a task id appears twice in one batch")
        marks = ", ".join("?" * len(ids))
        live = {
            task_id
            for (task_id,) in connection.execute(
                f"SELECT id FROM tasks WHERE id IN ({marks}) AND {_NOT_TERMINAL}",  # noqa: S608
                ids,
            )
        }
        written = [outcome for outcome in outcomes if outcome.task_id in live]
        by_event: dict[EventKind, list[tuple[Any, ...]]] = {}
        for outcome in written:
            values = outcome.values()
            row: tuple[Any, ...] = (values["status"], values["error"])
            if outcome.event is EventKind.SUCCEEDED:
                row += (_json(values["result"]),)
            if outcome.terminal:
                row += (stored_time(values["finished_at"]),)
            by_event.setdefault(outcome.event, []).append((*row, outcome.task_id))
        for event, rows in by_event.items():
            connection.executemany(_UPDATE[event], rows)
        connection.executemany(
            _INSERT_EVENT,
            [
                (
                    outcome.task_id,
                    stored_time(outcome.now),
                    outcome.event.value,
                    json.dumps(outcome.detail()),
                )
                for outcome in written
            ],
        )
        return {outcome.task_id for outcome in written}


def _rollback(connection: sqlite3.Connection) -> None:
    try:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # the error being raised says more; the connection is dropped with it
