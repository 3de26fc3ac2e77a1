"""Audit in SQL (migration 0009): comments on every table and column, and the audit_ views.

On SQLite and, with TEST_POSTGRES_URL, PostgreSQL: the database's comments equal the
models' (PostgreSQL's catalog, SQLite's ``audit_columns``), each view answers its question
for a small history written through the store's own APIs, and the revision goes down and
up again.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support import (
    downgrade,
    migrate,
    record_failure,
    record_outcome,
    start_attempt,
    submit_task,
)
from throttler.db import SessionFactory, create_engine, create_session_factory
from throttler.models import Base, Task, TaskEvent
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus
from throttler.store.attempts import Outcome
from throttler.store.outbox import open_outbox
from throttler.store.retries import RetryOutcome, RetryStore

VIEWS = ("audit_releases_per_second", "audit_task_timeline", "audit_operator_actions")
AUDIT_RELATIONS = (*VIEWS, "audit_columns")
MODEL_COMMENTS = {
    table.name: (table.comment, {column.name: column.comment for column in table.columns})
    for table in Base.metadata.sorted_tables
}
# A whole second, so that the releases below fall into known seconds.
T0 = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _utc(value: Any) -> datetime:
    """A timestamp as a view returns it: SQLite text (UTC, no offset) or a PostgreSQL one."""
    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    assert isinstance(value, datetime)
    return value.astimezone(UTC)


def _flag(value: Any) -> bool | None:
    """A view's boolean: PostgreSQL's, or SQLite's 1 or 0."""
    return None if value is None else bool(value)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@pytest.fixture
def audit_settings(database_url: str) -> Settings:
    """The migrated test database, without Redis: nothing here needs it."""
    return Settings(database_url=database_url)


@pytest.fixture
async def audit_engine(audit_settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(audit_settings)
    yield engine
    await engine.dispose()


async def _rows(engine: AsyncEngine, query: str) -> list[Any]:
    async with engine.connect() as connection:
        return list(await connection.execute(text(query)))


# --- comments ---------------------------------------------------------------------------


def _catalog_comments(connection: Connection) -> dict[str, tuple[str | None, dict[str, Any]]]:
    """What PostgreSQL's catalog says of every table and view (SQLAlchemy's inspector)."""
    inspector = inspect(connection)
    names = inspector.get_table_names() + inspector.get_view_names()
    return {
        name: (
            inspector.get_table_comment(name)["text"],
            {column["name"]: column.get("comment") for column in inspector.get_columns(name)},
        )
        for name in names
    }


async def _audit_columns(engine: AsyncEngine) -> dict[str, tuple[str | None, dict[str, Any]]]:
    rows = await _rows(
        engine,
        "SELECT table_name, column_name, position, comment FROM audit_columns"
        " ORDER BY table_name, position",
    )
    by_table: dict[str, tuple[str | None, dict[str, Any]]] = {}
    for table, column, _, comment in rows:
        if column is None:
            by_table[table] = (comment, {})
        else:
            by_table[table][1][column] = comment
    return by_table


async def test_audit_columns_match_the_models_and_leave_nothing_uncommented(
    audit_engine: AsyncEngine,
) -> None:
    listed = await _audit_columns(audit_engine)

    assert set(listed) >= set(MODEL_COMMENTS) | set(AUDIT_RELATIONS) | {"alembic_version"}
    for table, comments in MODEL_COMMENTS.items():
        assert listed[table] == comments, table
    for table, (comment, columns) in listed.items():
        assert comment, f"{table} has no comment"
        assert columns, f"{table} lists no column"
        assert all(columns.values()), f"{table}: columns without a comment: {columns}"


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_postgres_catalog_holds_the_models_comments(audit_engine: AsyncEngine) -> None:
    async with audit_engine.connect() as connection:
        catalog = await connection.run_sync(_catalog_comments)

    for table, comments in MODEL_COMMENTS.items():
        assert catalog[table] == comments, table
    # Every table and view of the schema, Alembic's own and the views' columns included.
    assert set(catalog) >= set(MODEL_COMMENTS) | set(AUDIT_RELATIONS) | {"alembic_version"}
    for table, (comment, columns) in catalog.items():
        assert comment, f"{table} has no comment"
        assert all(columns.values()), f"{table}: columns without a comment: {columns}"
    # audit_columns reads that same catalog.
    assert await _audit_columns(audit_engine) == catalog


# --- views over a small history ----------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class History:
    flaky: str  # greeting of alice: released twice (a retry), failed, explicitly retried
    download: str  # download of bob (host example.com): released once, force-cancelled
    stopped: str  # greeting of alice: released, requeued by a stopping worker, cancelled


async def _release(
    settings: Settings, engine: AsyncEngine, *, moments: dict[str, datetime]
) -> None:
    """The relay's claim: lease these pending tasks (the first in the claim order) each at
    its release moment, which writes their queued events, then delete their rows."""
    outbox = open_outbox(settings=settings, engine=engine)
    async with outbox.claiming() as claim:
        claims = await claim.select_claimable(limit=len(moments), now=max(moments.values()))
        assert sorted(c.task_id for c in claims) == sorted(moments)
        await claim.lease(
            claims=claims,
            queued_at=[moments[c.task_id] for c in claims],
            relay_id="relay-1",
            lease_s=30,
        )
        await claim.release(relay_id="relay-1", outbox_ids=[c.outbox_id for c in claims])


async def _cancel(sessions: SessionFactory, task_id: str, *, by: str, force: bool) -> None:
    """Write a cancel as the cancel API records it: the task final, a ``cancelled`` event
    with ``{"by", "from", "force"}`` (no store function for it yet: the same rows by hand)."""
    async with sessions.begin() as session:
        task = await session.get(Task, task_id)
        assert task is not None
        event = TaskEvent(
            task_id=task_id,
            at=_at(5),
            event=EventKind.CANCELLED,
            detail={"by": by, "from": task.status, "force": force},
        )
        task.status, task.finished_at = TaskStatus.CANCELLED, _at(5)
        session.add(event)


async def _write_history(settings: Settings, engine: AsyncEngine) -> History:
    sessions = create_session_factory(engine)
    async with sessions.begin() as session:
        submitted = [
            await submit_task(
                session, name=name, account=account, payload={}, host=host, now=_at(-10 + n)
            )
            for n, (name, account, host) in enumerate(
                [
                    ("greeting", "alice", None),
                    ("download", "bob", "example.com"),
                    ("greeting", "alice", None),
                ]
            )
        ]
    history = History(flaky=submitted[0].id, download=submitted[1].id, stopped=submitted[2].id)

    # Second 12:00:00: two releases; second 12:00:01: two more, one of them a retry.
    await _release(settings, engine, moments={history.flaky: _at(0.1), history.download: _at(0.7)})
    async with sessions.begin() as session:
        assert await start_attempt(session, task_id=history.flaky, worker_id="w1", now=_at(0.2))
        retrying = Outcome(
            task_id=history.flaky,
            event=EventKind.RETRYING,
            attempt=1,
            worker_id="w1",
            now=_at(0.3),
            error="boom",
            defer_s=0.0,
            tries_base=0,
        )
        assert await record_outcome(session, retrying)
    await _release(settings, engine, moments={history.flaky: _at(1.5), history.stopped: _at(1.2)})
    async with sessions.begin() as session:
        for task_id in (history.flaky, history.stopped):
            assert await start_attempt(session, task_id=task_id, worker_id="w2", now=_at(1.6))
        assert await record_failure(
            session, task_id=history.flaky, error="final", attempt=2, worker_id="w2", now=_at(2)
        )
        stopping = Outcome(
            task_id=history.stopped,
            event=EventKind.REQUEUED,
            attempt=1,
            worker_id="w2",
            now=_at(2),
            error="the worker stopped",
            reason="worker_stopping",
        )
        assert await record_outcome(session, stopping)

    answer = await RetryStore(engine).retry(task_id=history.flaky, account="alice", now=_at(3))
    assert answer.outcome is RetryOutcome.RETRIED
    await _cancel(sessions, history.stopped, by="alice", force=False)
    await _cancel(sessions, history.download, by="root", force=True)
    return history


async def test_releases_per_second_count_every_release_by_scope(
    audit_settings: Settings, audit_engine: AsyncEngine
) -> None:
    await _write_history(audit_settings, audit_engine)

    rows = await _rows(
        audit_engine, "SELECT second, scope, released FROM audit_releases_per_second"
    )

    counted = {(_utc(second), scope): released for second, scope, released in rows}
    first, next_second = T0, T0 + timedelta(seconds=1)
    assert counted == {
        (first, "cluster"): 2,
        (first, "task:greeting"): 1,
        (first, "task:download"): 1,
        (first, "account:alice"): 1,
        (first, "account:bob"): 1,
        (first, "host:example.com"): 1,
        # The flaky task's second attempt is a release of its own: the limits count it.
        (next_second, "cluster"): 2,
        (next_second, "task:greeting"): 2,
        (next_second, "account:alice"): 2,
    }


async def test_task_timeline_is_the_tasks_history_with_who_did_what(
    audit_settings: Settings, audit_engine: AsyncEngine
) -> None:
    history = await _write_history(audit_settings, audit_engine)

    rows = await _rows(
        audit_engine,
        "SELECT task_id, name, account, event_id, at, event, attempt, actor, reason, error,"
        f" detail FROM audit_task_timeline WHERE task_id = '{history.flaky}' ORDER BY event_id",
    )

    assert {(row.task_id, row.name, row.account) for row in rows} == {
        (history.flaky, "greeting", "alice")
    }
    assert [row.event_id for row in rows] == sorted(row.event_id for row in rows)
    assert [(row.event, row.attempt, row.actor, row.error) for row in rows] == [
        ("submitted", None, "alice", None),
        ("queued", None, "relay-1", None),
        ("started", 1, "w1", None),
        ("retrying", 1, "w1", "boom"),
        ("queued", None, "relay-1", None),
        ("started", 2, "w2", None),
        ("failed", 2, "w2", "final"),
        ("retried", None, "alice", None),
    ]
    assert [_utc(row.at) for row in rows] == [
        _at(-10),
        _at(0.1),
        _at(0.2),
        _at(0.3),
        _at(1.5),
        _at(1.6),
        _at(2),
        _at(3),
    ]
    assert _json(rows[-1].detail) == {"by": "alice", "attempts": 2}

    (requeued,) = await _rows(
        audit_engine,
        "SELECT actor, reason, error FROM audit_task_timeline"
        f" WHERE task_id = '{history.stopped}' AND event = 'requeued'",
    )
    assert tuple(requeued) == ("w2", "worker_stopping", "the worker stopped")


async def test_operator_actions_are_the_cancels_and_retries_with_who_asked(
    audit_settings: Settings, audit_engine: AsyncEngine
) -> None:
    history = await _write_history(audit_settings, audit_engine)

    rows = await _rows(
        audit_engine,
        "SELECT event_id, at, action, task_id, name, account, asked_by, from_status, forced,"
        " attempts FROM audit_operator_actions ORDER BY event_id",
    )

    assert [
        (
            row.action,
            row.task_id,
            row.name,
            row.account,
            row.asked_by,
            row.from_status,
            _flag(row.forced),
            row.attempts,
        )
        for row in rows
    ] == [
        ("retried", history.flaky, "greeting", "alice", "alice", None, None, 2),
        ("cancelled", history.stopped, "greeting", "alice", "alice", "pending", False, None),
        ("cancelled", history.download, "download", "bob", "root", "queued", True, None),
    ]
    assert [_utc(row.at) for row in rows] == [_at(3), _at(5), _at(5)]


# --- the README's sqlite3 commands ------------------------------------------------------


def _readme_sqlite3_script() -> str:
    """The sqlite3 block of the README's audit section (the psql one: test_readme_psql)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    start = readme.index("## Auditing the database")
    section = readme[start : readme.index("\n## ", start)]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    (script,) = [block for block in blocks if re.search(r"^sqlite3 ", block, re.MULTILINE)]
    return str(script)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_readme_sqlite3_commands_run_as_written(
    audit_settings: Settings, audit_engine: AsyncEngine, tmp_path: Path
) -> None:
    if shutil.which("sqlite3") is None:
        pytest.skip("needs the sqlite3 command-line shell")
    await _write_history(audit_settings, audit_engine)
    await audit_engine.dispose()
    # The README names the default DATABASE_URL's file, in the directory it is run from.
    shutil.copyfile(audit_settings.database_url.split("///", 1)[1], tmp_path / "arq_throttler.db")

    finished = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _readme_sqlite3_script()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert finished.returncode == 0, finished.stderr
    assert finished.stderr == ""
    lines = finished.stdout.splitlines()
    assert "second|released" in lines
    assert "2026-11-29 12:00:01|2" in lines
    assert "cluster|4" in lines  # the busiest 10-second window: all four releases
    assert "at|action|task_id|asked_by|from_status|forced|attempts" in lines


# --- down and up again -------------------------------------------------------------------


def _schema(database_url: str) -> tuple[set[str], dict[str, tuple[str | None, dict[str, Any]]]]:
    """The database's views, and its tables' comments (empty on SQLite)."""

    def read(connection: Connection) -> tuple[set[str], dict[str, Any]]:
        inspector = inspect(connection)
        comments = _catalog_comments(connection) if connection.dialect.name == "postgresql" else {}
        return set(inspector.get_view_names()), comments

    async def run() -> tuple[set[str], dict[str, Any]]:
        engine = create_engine(Settings(database_url=database_url))
        try:
            async with engine.connect() as connection:
                return await connection.run_sync(read)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_downgrade_removes_views_and_comments_and_upgrade_restores_them(
    empty_database: str,
) -> None:
    migrate(empty_database)
    views, comments = _schema(empty_database)
    assert views == set(AUDIT_RELATIONS)
    expected = _model_tables(comments)

    downgrade(empty_database, "0008")
    views, comments = _schema(empty_database)
    assert views == set()
    # 0008 gave the labels their comments and keeps them; 0009 took every other away.
    if comments:  # PostgreSQL
        labels_comment, labels_columns = comments.pop("task_labels")
        assert labels_comment
        assert None not in labels_columns.values()
        assert comments["tasks"][1].pop("labels")
    for table, (comment, columns) in comments.items():
        assert comment is None, table
        assert set(columns.values()) == {None}, table

    downgrade(empty_database, "base")
    migrate(empty_database)
    views, comments = _schema(empty_database)
    assert views == set(AUDIT_RELATIONS)
    assert _model_tables(comments) == expected


def _model_tables(comments: dict[str, Any]) -> dict[str, Any]:
    return {table: comments[table] for table in MODEL_COMMENTS if table in comments}
