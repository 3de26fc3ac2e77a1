"""throttler.errors judges a database error by its driver's code: the environment's or ours."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from throttler.errors import is_transient_db_error


def wrapped(error: Exception) -> DBAPIError:
    """As SQLAlchemy raises a driver's error: for sqlite3, the class named after the
    driver's; for asyncpg's (whose adapted errors keep its ``sqlstate``), the base class."""
    if isinstance(error, sqlite3.Error):
        wrapper = DBAPIError.instance("INSERT INTO tasks ...", None, error, sqlite3.Error)
        assert isinstance(wrapper, DBAPIError)
        return wrapper
    return DBAPIError("INSERT INTO tasks ...", None, error)


def sqlite_error(path: Path, *statements: str, setup: tuple[str, ...] = ()) -> sqlite3.Error:
    """The error SQLite itself raises for the last of ``statements``."""
    connection = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        for statement in setup:
            connection.execute(statement)
        for statement in statements:
            connection.execute(statement)
    except sqlite3.Error as error:
        return error
    finally:
        connection.close()
    raise AssertionError("no error")


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.InsufficientPrivilegeError("permission denied for table tasks"),
        asyncpg.exceptions.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only"),
        asyncpg.exceptions.DiskFullError("could not extend file"),
        asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.LockNotAvailableError("could not obtain lock"),
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
        asyncpg.exceptions.QueryCanceledError("canceling statement due to statement timeout"),
        # The schema behind the code: migrations not run yet.
        asyncpg.exceptions.UndefinedTableError('relation "tasks" does not exist'),
        asyncpg.exceptions.UndefinedColumnError('column "keys" does not exist'),
    ],
    ids=lambda error: type(error).__name__,
)
def test_postgres_errors_of_the_environment_are_transient(error: Exception) -> None:
    assert is_transient_db_error(wrapped(error))
    assert is_transient_db_error(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.PostgresSyntaxError("syntax error"),
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        asyncpg.exceptions.UntranslatableCharacterError("unsupported Unicode escape sequence"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_postgres_errors_of_the_statement_are_not(error: Exception) -> None:
    assert not is_transient_db_error(wrapped(error))


def test_a_revoked_privilege_is_transient_though_sqlalchemy_calls_it_a_programming_error() -> None:
    error = ProgrammingError("INSERT", {}, asyncpg.exceptions.InsufficientPrivilegeError("no"))
    assert is_transient_db_error(error)


def test_sqlite_locked_read_only_and_full_are_transient(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    sqlite_error(path, "CREATE TABLE t (x BLOB)", "SELECT nope")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        locked = sqlite_error(path, "BEGIN IMMEDIATE")
    finally:
        holder.close()
    read_only = sqlite_error(path, "INSERT INTO t VALUES (1)", setup=("PRAGMA query_only=1",))
    # max_page_count holds for this connection only: a full disk, as SQLite reports it.
    full = sqlite_error(
        path,
        "INSERT INTO t VALUES (zeroblob(1000000))",
        setup=("PRAGMA max_page_count=2",),
    )

    assert (locked.sqlite_errorname, full.sqlite_errorname) == ("SQLITE_BUSY", "SQLITE_FULL")
    assert read_only.sqlite_errorname == "SQLITE_READONLY"
    for error in (locked, read_only, full):
        assert is_transient_db_error(wrapped(error)), error


def test_sqlite_statement_errors_are_not(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    syntax = sqlite_error(path, "SELEC 1")
    constraint = sqlite_error(
        path,
        "CREATE TABLE u (x INTEGER PRIMARY KEY)",
        "INSERT INTO u VALUES (1)",
        "INSERT INTO u VALUES (1)",
    )

    assert not is_transient_db_error(wrapped(syntax))
    assert not is_transient_db_error(wrapped(constraint))


def test_sqlite_schema_behind_the_code_is_transient(tmp_path: Path) -> None:
    """An unmigrated database is the environment's state: 503 until ``alembic upgrade``."""
    path = tmp_path / "db.sqlite"
    no_table = sqlite_error(path, "SELECT id FROM tasks")
    no_column = sqlite_error(path, "CREATE TABLE tasks (id TEXT)", "SELECT keys FROM tasks")

    assert (no_table.sqlite_errorname, no_column.sqlite_errorname) == ("SQLITE_ERROR",) * 2
    assert is_transient_db_error(wrapped(no_table))
    assert is_transient_db_error(wrapped(no_column))


def test_errors_without_a_code_are_judged_by_their_class() -> None:
    assert is_transient_db_error(OperationalError("SELECT 1", {}, ConnectionResetError("reset")))
    assert not is_transient_db_error(ProgrammingError("SELECT 1", {}, ValueError("bad")))
    assert is_transient_db_error(ConnectionRefusedError("refused"))
    assert not is_transient_db_error(ValueError("not a database error"))
