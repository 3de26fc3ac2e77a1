"""SQLite's fast paths for the outbox store: one writer at a time, an index hint, and
the lease's statements on the driver.

A claim of 1,000 rows through SQLAlchemy's execution layer spent more of the relay's CPU
on binding (one placeholder per id, each value through its type's processor, the ORM's
bulk paths) than SQLite spent running the statements. Here the lease's statements are the
reference's (``LeaseStatements``), compiled once for SQLite with each batch of ids as one
JSON array (``throttler.store.sqlite_ids``), and run with ``exec_driver_sql`` on the claim's
own connection and transaction. The rows are the reference's:
tests/integration/store/test_outbox_parity.py.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache
from typing import ClassVar

from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect

from throttler.store.compiled import CompiledStatement
from throttler.store.outbox import (
    CoreClaim,
    CoreOutbox,
    LeaseStatement,
    LeaseStatements,
    Values,
)
from throttler.store.sqlite_ids import ids_in_json, json_ids

_DIALECT = sqlite_dialect(paramstyle="qmark")
# The parameters that hold a batch of ids (``LeaseStatements.build``'s ``among`` names).
_ID_LISTS = frozenset(("outbox_ids", "task_ids"))


@dataclass(frozen=True, kw_only=True, slots=True)
class _Compiled:
    release: CompiledStatement
    lease: CompiledStatement
    queue_all: CompiledStatement
    queue_each: CompiledStatement
    insert_event: CompiledStatement


@lru_cache(maxsize=1)
def _statements() -> _Compiled:
    built = LeaseStatements.build(ids_in_json)
    compiled = {
        field.name: CompiledStatement.of(getattr(built, field.name), _DIALECT)
        for field in fields(built)
    }
    return _Compiled(**compiled)


def _as_json(values: Values) -> Values:
    return {name: json_ids(v) if name in _ID_LISTS else v for name, v in values.items()}


class SqliteClaim(CoreClaim):
    """A claim in a ``BEGIN IMMEDIATE`` transaction: it already holds the write lock."""

    # Nobody else writes until this transaction commits, so the rows read in rank order
    # are the claim: no second statement to lock them.
    reads_are_locks: ClassVar[bool] = True
    # Without ANALYZE statistics SQLite picks the (status, ...) indexes for the equality on
    # status and sorts every pending task instead of seeking one account at a time.
    accounts_hint: ClassVar[str] = "INDEXED BY ix_tasks_pending_turn"

    async def _write(self, name: LeaseStatement, values: Values | list[Values]) -> None:
        statement: CompiledStatement = getattr(_statements(), name)
        connection = await self.session.connection()
        if isinstance(values, list):
            await connection.exec_driver_sql(statement.sql, statement.bind_many(values))
        else:
            await connection.exec_driver_sql(statement.sql, tuple(statement.bind(_as_json(values))))


class SqliteOutbox(CoreOutbox):
    """The outbox store on SQLite (claims serialize on the database's write lock)."""

    claim_type: ClassVar[type[CoreClaim]] = SqliteClaim
