"""``CompiledStatement.bind_many``: an executemany's rows bound as ``bind`` binds each one.

It converts a value once while consecutive rows share the same object (a batch's moment,
its detail): the rows it gives must still be exactly ``bind``'s, whatever the rows share.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from throttler.statuses import EventKind
from throttler.store.compiled import CompiledStatement
from throttler.store.outbox import LeaseStatements

AT = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def _statement() -> CompiledStatement:
    return CompiledStatement.of(LeaseStatements.build().insert_event, sqlite_dialect())


def test_rows_sharing_values_bind_as_each_alone() -> None:
    shared = {"relay": "r-1"}
    rows: list[dict[str, Any]] = [
        {"task_id": f"t{i}", "at": AT, "event": EventKind.QUEUED, "detail": shared}
        for i in range(3)
    ]
    statement = _statement()
    assert statement.bind_many(rows) == [tuple(statement.bind(row)) for row in rows]
    # Converted, not passed through: the driver gets SQLite's text for each.
    assert statement.bind_many(rows)[0][1:] == (
        "2030-01-02 03:04:05.678901",
        "queued",
        '{"relay": "r-1"}',
    )


def test_a_value_that_changes_between_rows_is_converted_again() -> None:
    # Equal objects, different ones, and a shared one coming back after another.
    first, second = {"relay": "a"}, {"relay": "b"}
    rows: list[dict[str, Any]] = [
        {"task_id": "t0", "at": AT, "event": EventKind.QUEUED, "detail": first},
        {
            "task_id": "t1",
            "at": AT + timedelta(seconds=1),
            "event": EventKind.QUEUED,
            "detail": second,
        },
        {"task_id": "t2", "at": AT, "event": EventKind.QUEUED, "detail": first},
        {"task_id": "t3", "at": AT, "event": EventKind.STARTED, "detail": {"relay": "a"}},
    ]
    statement = _statement()
    bound = statement.bind_many(rows)
    assert bound == [tuple(statement.bind(row)) for row in rows]
    assert [row[2] for row in bound] == ["queued", "queued", "queued", "started"]
    assert bound[1][1] == "2030-01-02 03:04:06.678901"
