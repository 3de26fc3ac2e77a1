"""The attempts' statements compiled once for a driver: what the fast paths run.

The fast paths (``sqlite_attempts``, ``postgres_attempts``) skip SQLAlchemy's execution
layer (statement set-up, bind processing per call, result wrapping: most of a worker's
CPU per write), but not its SQL or its types: each statement is the reference's Core
(``throttler.store.attempts``), compiled by SQLAlchemy for the dialect, and each value is
converted by the dialect's own bind and result processors, so the rows are the
reference's (tests/integration/store/test_attempts_parity.py). The ids of a batch go in as
ONE parameter (``among``: a JSON array on SQLite, an array on PostgreSQL), so each
statement's SQL is fixed whatever the batch size, and is prepared once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Dialect, bindparam, delete, insert, update
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from throttler.models import UTCDateTime
from throttler.statuses import EventKind
from throttler.store.attempts import (
    EVENTS,
    OUTBOX,
    TASKS,
    Among,
    Outcome,
    Processor,
    locked_rows,
    start_statement,
)

_MISSING = object()


@dataclass(frozen=True, kw_only=True, slots=True)
class CompiledStatement:
    """A Core statement compiled for a dialect: its SQL, and how to bind a row of values."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Processor | None, ...]
    # The statement's own values (constants in it), already converted.
    constants: dict[str, Any]

    @classmethod
    def of(cls, statement: ClauseElement, dialect: Dialect) -> CompiledStatement:
        # render_postcompile: the constant lists (the terminal statuses) as plain
        # placeholders, so the SQL is fixed; every other value is a named bindparam.
        compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        assert isinstance(compiled, SQLCompiler)
        names = tuple(compiled.positiontup or ())
        binds = compiled.binds
        processors: list[Processor | None] = []
        for name in names:
            # An expanded list's placeholders (status_1_1, ...) share their list's type.
            bind = binds[name] if name in binds else binds[name.rsplit("_", 1)[0]]
            processors.append(bind_processor(bind.type, dialect))
        constants = {
            name: value if process is None else process(value)
            for name, process in zip(names, processors, strict=True)
            if (value := compiled.params.get(name)) is not None
        }
        return cls(
            sql=compiled.string,
            names=names,
            processors=tuple(processors),
            constants=constants,
        )

    def bind(self, values: Mapping[str, Any]) -> list[Any]:
        """The positional parameters for ``values`` (converted) and the constants."""
        return [
            (value if process is None else process(value))
            if (value := values.get(name, _MISSING)) is not _MISSING
            else self.constants.get(name)
            for name, process in zip(self.names, self.processors, strict=True)
        ]

    def bind_many(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """``bind`` for each row, for an executemany: a value the row before held too (the
        same object: a batch's shared moment, detail or kind) is not converted again."""
        bound: list[tuple[Any, ...]] = []
        last: list[tuple[Any, Any]] = [(_MISSING, None)] * len(self.names)
        for row in rows:
            params = []
            for index, (name, process) in enumerate(zip(self.names, self.processors, strict=True)):
                value = row.get(name, _MISSING)
                if value is _MISSING:
                    params.append(self.constants.get(name))
                    continue
                if process is not None:
                    seen, converted = last[index]
                    if seen is not value:
                        converted = process(value)
                        last[index] = (value, converted)
                    value = converted
                params.append(value)
            bound.append(tuple(params))
        return bound


def bind_processor(column_type: Any, dialect: Dialect) -> Processor | None:
    process: Processor | None = column_type.dialect_impl(dialect).bind_processor(dialect)
    if process is not None and isinstance(column_type, UTCDateTime):
        # A batch's starts share one moment, and its outcomes often do: each distinct
        # moment is converted once.
        return lru_cache(maxsize=256)(process)
    return process


def result_processor(column: Any, dialect: Dialect) -> Processor | None:
    processor: Processor | None = column.type.dialect_impl(dialect).result_processor(dialect, None)
    return processor


@dataclass(frozen=True, kw_only=True, slots=True)
class AttemptStatements:
    """Every statement a batch of starts and outcomes runs, compiled for one dialect."""

    locked: CompiledStatement
    start: CompiledStatement
    insert_event: CompiledStatement
    # One statement per shape of outcome, as Outcome.values() sets them.
    update: dict[EventKind, CompiledStatement]
    delete_outbox: CompiledStatement
    insert_outbox: CompiledStatement
    # The driver's values of the columns read back, as SQLAlchemy would return them.
    payload: Processor | None
    queued_at: Processor | None

    @classmethod
    def compile(cls, dialect: Dialect, among: Among) -> AttemptStatements:
        def of(statement: ClauseElement) -> CompiledStatement:
            return CompiledStatement.of(statement, dialect)

        return cls(
            locked=of(locked_rows(among)),
            start=of(start_statement(among)),
            insert_event=of(_insert(EVENTS, ("task_id", "at", "event", "detail"))),
            update={
                event: of(
                    update(TASKS)
                    .where(TASKS.c.id == bindparam("task_key", value=None, type_=TASKS.c.id.type))
                    .values({column: _bind(TASKS, column) for column in outcome.values()})
                )
                for event, outcome in _SAMPLE_OUTCOMES.items()
            },
            delete_outbox=of(delete(OUTBOX).where(among(OUTBOX.c.task_id))),
            insert_outbox=of(_insert(OUTBOX, ("task_id", "created_at"))),
            payload=result_processor(TASKS.c.payload, dialect),
            queued_at=result_processor(TASKS.c.queued_at, dialect),
        )


def _bind(table: Any, column: str) -> Any:
    return bindparam(column, value=None, type_=table.c[column].type)


def _insert(table: Any, columns: tuple[str, ...]) -> ClauseElement:
    # inline: no RETURNING of the new id, which a driver's executemany would only discard.
    return insert(table).values({column: _bind(table, column) for column in columns}).inline()


# An outcome of each kind: the columns each sets (Outcome.values()).
_SAMPLE_OUTCOMES = {
    event: Outcome(
        task_id="",
        event=event,
        attempt=1,
        worker_id="",
        now=datetime.now().astimezone(),
        tries_base=0 if event is EventKind.RETRYING else None,
    )
    for event in (EventKind.SUCCEEDED, EventKind.FAILED, EventKind.RETRYING, EventKind.REQUEUED)
}
