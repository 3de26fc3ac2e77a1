"""One classification of the errors every loop meets: Redis away, database away, bad statement.

Every loop that talks to Redis or the database (relay steps, reconciler and retention
passes, pub/sub listeners, the worker's supervisor and status writes, the API's 503/500
split) decides with these and nothing else, so "is it worth trying again?" has one answer.

A database error is judged by the error itself where the driver gives a code (PostgreSQL's
SQLSTATE, SQLite's result code), not by SQLAlchemy's class: asyncpg's "permission denied"
(42501) arrives as a ProgrammingError, like a syntax error, yet a GRANT, not a code fix,
ends it. The class decides only for an error without a code.
"""

from __future__ import annotations

import sqlite3

from redis.exceptions import RedisError
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    NotSupportedError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

# Redis is away, restarting, failing over or too slow: try again later. Every redis-py
# error is a RedisError (a connection lost between WATCH and EXEC is a WatchError, a
# replica during a failover answers ReadOnlyError, a restarting server BusyLoadingError);
# a refused or timed-out connect can also surface as a plain OSError or TimeoutError.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError, TimeoutError)

# Connection loss, lock timeouts, a full pool, a refused or timed-out connect (a driver
# may raise those as OSError, outside SQLAlchemy's wrapping): the database is away for now.
# By class only: is_transient_db_error below decides by the driver's code first.
TRANSIENT_DB_ERRORS: tuple[type[Exception], ...] = (DBAPIError, PoolTimeoutError, OSError)
# DBAPIError subclasses that say the statement or its data is wrong, not that the database
# is away: another try cannot help (a 500 in the API, not a 503). Only for an error whose
# driver gives no code (see is_transient_db_error).
STATEMENT_ERRORS: tuple[type[Exception], ...] = (
    DataError,
    IntegrityError,
    NotSupportedError,
    ProgrammingError,
)

# A background pass (relay step, reconciler, pruner) that fails for one of these is
# logged and tried again after a pause; anything else is a bug and ends the loop.
RECOVERABLE_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, *REDIS_ERRORS)


# PostgreSQL SQLSTATE classes (the first two characters) that describe the server's state,
# not the statement: connection exception, invalid authorization (a password changed),
# insufficient resources (disk full, out of memory, too many connections), operator
# intervention (shutting down, cancelled, statement timeout), system error (I/O),
# configuration file error, internal error.
_PG_ENVIRONMENT_CLASSES = frozenset({"08", "28", "53", "57", "58", "F0", "XX"})
# Single SQLSTATEs of the same kind in classes that otherwise mean a bad statement.
_PG_ENVIRONMENT_CODES = frozenset(
    {
        "42501",  # insufficient_privilege: REVOKE'd, until GRANT'ed again
        "25006",  # read_only_sql_transaction: a standby, or default_transaction_read_only
        "25P03",  # idle_in_transaction_session_timeout
        "25P04",  # transaction_timeout
        "40001",  # serialization_failure
        "40003",  # statement_completion_unknown
        "40P01",  # deadlock_detected
        "55006",  # object_in_use
        "55P03",  # lock_not_available
        # The schema is not at head (migrations not run yet, or a rollout ahead of them):
        # ``alembic upgrade head``, not a code fix, ends it.
        "42P01",  # undefined_table
        "42703",  # undefined_column
    }
)
# SQLite reports a missing table or column with its generic SQLITE_ERROR, which a syntax
# error shares: only the message tells the schema's state from the statement's fault.
_SQLITE_SCHEMA_BEHIND = ("no such table:", "no such column:")
# SQLite primary result codes (the low byte of the extended code) that describe the file
# or the machine, not the statement: permission, busy, locked, out of memory, read-only,
# interrupted, I/O error, corrupt, disk full, cannot open, lock protocol, schema changed
# by another connection, no large files.
_SQLITE_ENVIRONMENT_CODES = frozenset(
    {
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_INTERRUPT,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_SCHEMA,
        sqlite3.SQLITE_NOLFS,
    }
)


def _environment_by_code(driver_error: BaseException) -> bool | None:
    """Whether the driver's code says the database's state is at fault; None without a code."""
    # asyncpg's errors (and SQLAlchemy's adaptation of them) carry ``sqlstate``, psycopg's
    # ``pgcode``.
    sqlstate = getattr(driver_error, "sqlstate", None) or getattr(driver_error, "pgcode", None)
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        return sqlstate[:2] in _PG_ENVIRONMENT_CLASSES or sqlstate in _PG_ENVIRONMENT_CODES
    code = getattr(driver_error, "sqlite_errorcode", None)
    if isinstance(code, int):
        if code == sqlite3.SQLITE_ERROR:
            return str(driver_error).startswith(_SQLITE_SCHEMA_BEHIND)
        return code & 0xFF in _SQLITE_ENVIRONMENT_CODES
    return None


def is_transient_db_error(error: BaseException) -> bool:
    """Whether the database, not the statement, is at fault: another try may succeed.

    True for a database away, locked, full, read-only or without the privileges the
    statement needs (each ends without a change to our code); False for a statement or
    data the database rejects (another try fails the same way). The API answers the
    first with 503 and Retry-After, the second with 500.
    """
    if isinstance(error, DBAPIError):
        by_code = _environment_by_code(error.orig) if error.orig is not None else None
        if by_code is not None:
            return by_code
        if error.connection_invalidated:
            return True
        return not isinstance(error, STATEMENT_ERRORS)
    by_code = _environment_by_code(error)
    if by_code is not None:
        return by_code
    return isinstance(error, TRANSIENT_DB_ERRORS)
