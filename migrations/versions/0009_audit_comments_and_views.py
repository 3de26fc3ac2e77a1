"""Audit in SQL: a comment on every table and column, and views for the auditor's questions

Comments (PostgreSQL): every table and column of the schema, Alembic's own table too, and
every view and view column, say what an auditor needs (meaning, units, UTC, values, who
writes). SQLite has no comments: the view ``audit_columns`` lists them on both databases
(PostgreSQL reads its catalog; SQLite joins a frozen copy to the real columns, so a column
left without a comment shows NULL there).

Views, same columns and meaning on both databases (the bodies differ only where the SQL
must: JSON extraction and truncating a timestamp to its second):

- ``audit_releases_per_second``: attempts released to ARQ, per UTC second and per scope
  (``cluster``, ``task:<name>``, ``account:<id>``, ``host:<host>``). A release is a
  ``queued`` event at its ``at``: the relay writes one per dispatch, at the moment the
  token fell due (the job starts no earlier; a relay that re-times a late job moves the
  event with ``tasks.queued_at``), and a repeat claim after a relay crash writes none. So
  these are the releases the limits' guarantee counts (released <= rate*T + burst, retries
  and recoveries included). ``tasks.queued_at`` is not used: it keeps only the latest
  dispatch of each task.
- ``audit_task_timeline``: one row per event with its task's name and account and the
  detail's common fields (attempt, actor, reason, error); order by ``event_id``.
- ``audit_operator_actions``: cancels and explicit retries, with who asked (``detail.by``).
- ``audit_columns``: the comments, one row per table or view (``column_name`` NULL) and
  per column.

A later migration may batch-alter ``tasks`` or ``task_events`` on SQLite (a table copy
renamed into place) although the views read them: ``migrations/env.py`` sets
``PRAGMA legacy_alter_table``, without which SQLite (3.26+) refuses the rename ("error in
view ...: no such table"). A later migration that adds a table or column
must give it a comment on PostgreSQL and re-create ``audit_columns`` on SQLite with it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the models' comments (throttler/models.py) as of this revision.
TABLES: dict[str, tuple[str, dict[str, str]]] = {
    "tasks": (
        (
            "One row per accepted task: its request, where it is now and how it ended. Inserted"
            " by the API with its outbox row and submitted event; then changed by the relay "
            "(queued), workers (running, outcomes), recovery and explicit retries; deleted only"
            " by retention (RETENTION_DAYS), with its events. Its history: task_events."
        ),
        {
            "id": (
                "Task id, a UUID4 chosen by the API. Each ARQ job id is <id>@<release moment in"
                " microseconds since the epoch> (one per dispatch)."
            ),
            "name": (
                "Task name: the function a worker runs (greeting, download, ...). Limit scope "
                "task:<name>."
            ),
            "account": (
                "Account that submitted the task: its API key's account, or 'default' when "
                "API_KEYS is unset. Limit scope account:<id>."
            ),
            "payload": "The task's input (JSON) as submitted; never changed.",
            "host": (
                "Host a download contacts, canonical (lower case; an IP address in one "
                "spelling, IPv6 in brackets). Limit scope host:<host>. NULL for other tasks."
            ),
            "status": (
                "Where the task is: pending (in the outbox), queued (released to ARQ), running,"
                " succeeded, failed or cancelled (the last three final; only an explicit retry "
                "takes failed or cancelled back to pending)."
            ),
            "priority": (
                "0 to 9, set at submission (default 5): the relay releases an account's pending"
                " tasks by priority, higher first, then age."
            ),
            "attempts": (
                "Attempts started, every one counted (first, retries, recoveries, explicit "
                "retries); a worker adds 1 when it starts one."
            ),
            "tries_base": (
                "attempts when the task was last explicitly retried (0 if never): a worker "
                "counts only the attempts after it against the task's tries (WORKER_MAX_TRIES)."
            ),
            "result": (
                "The task's result (JSON), written by the worker when it succeeded; NULL "
                "otherwise (an explicit retry clears it)."
            ),
            "error": (
                "Error of the last failed or retrying attempt, or recovery's; NULL after a "
                "success and after an explicit retry (task_events keeps every error)."
            ),
            "created_at": (
                "When the API accepted the task. UTC (PostgreSQL timestamptz; SQLite text "
                "YYYY-MM-DD HH:MM:SS.ffffff, UTC, no offset)."
            ),
            "run_at": (
                "Earliest moment the relay may release the next attempt: the submission's "
                "delay, a retry's backoff, an explicit retry's moment; NULL means at once. UTC "
                "(PostgreSQL timestamptz; SQLite text YYYY-MM-DD HH:MM:SS.ffffff, UTC, no "
                "offset)."
            ),
            "queued_at": (
                "Release moment of the latest dispatch to ARQ, set by the relay (the job starts"
                " no earlier; each release is also a queued event at this moment); NULL once "
                "recovery puts the task back in the outbox. UTC (PostgreSQL timestamptz; SQLite"
                " text YYYY-MM-DD HH:MM:SS.ffffff, UTC, no offset)."
            ),
            "started_at": (
                "When a worker started the latest attempt. UTC (PostgreSQL timestamptz; SQLite "
                "text YYYY-MM-DD HH:MM:SS.ffffff, UTC, no offset)."
            ),
            "finished_at": (
                "When the task became succeeded, failed or cancelled; NULL while not final (an "
                "explicit retry clears it). UTC (PostgreSQL timestamptz; SQLite text YYYY-MM-DD"
                " HH:MM:SS.ffffff, UTC, no offset)."
            ),
            "idempotency_key": (
                "The client's Idempotency-Key (header, or a bulk item's idempotency_key), "
                "unique within the account; NULL without one."
            ),
            "request_hash": (
                "SHA-256 (hex) of the request the idempotency key came with: a repeat with "
                "another request under the same key is refused. NULL without a key."
            ),
        },
    ),
    "outbox": (
        (
            "Tasks waiting for the relay, one row per trip through the outbox (submission, "
            "retry, recovery, explicit retry). A relay leases rows, marks their tasks queued, "
            "hands them to ARQ, then deletes the rows."
        ),
        {
            "id": "Insertion order: the last tie-break of the claim order (priority, age).",
            "task_id": "The waiting task (tasks.id); one row per task at most.",
            "created_at": (
                "When the row was written. UTC (PostgreSQL timestamptz; SQLite text YYYY-MM-DD "
                "HH:MM:SS.ffffff, UTC, no offset)."
            ),
            "claimed_by": (
                "Id of the relay that leased the row and is handing its task to ARQ; NULL while"
                " unclaimed."
            ),
            "claimed_until": (
                "End of that lease: after it another relay may take the row (a crashed relay's "
                "claims). UTC (PostgreSQL timestamptz; SQLite text YYYY-MM-DD HH:MM:SS.ffffff, "
                "UTC, no offset)."
            ),
        },
    ),
    "task_events": (
        (
            "The audit trail: one row per transition of a task, appended in the transaction "
            "that makes it. Never updated, except that a relay moves a queued event it has not "
            "yet handed to ARQ to its later release moment; deleted only with its task, by "
            "retention. Views: audit_task_timeline, audit_releases_per_second, "
            "audit_operator_actions."
        ),
        {
            "id": "Append order: a task's events by id are its history.",
            "task_id": "The task (tasks.id).",
            "at": (
                "When the transition happened; for queued, the release moment (the job starts "
                "no earlier; equals tasks.queued_at of that dispatch). UTC (PostgreSQL "
                "timestamptz; SQLite text YYYY-MM-DD HH:MM:SS.ffffff, UTC, no offset)."
            ),
            "event": (
                "submitted (API), queued (relay released it to ARQ), started, retrying, "
                "succeeded, failed (worker, or recovery), cancelled, requeued (back in the "
                "outbox by recovery or a stopping worker), retried (an explicit retry)."
            ),
            "detail": (
                "JSON by event: submitted {account}; queued {relay}; started {attempt, worker};"
                " retrying {attempt, worker, error, defer_s}; succeeded {attempt, worker}; "
                "failed {attempt, worker, error} or by recovery {reason, previous_status, "
                "attempt, error}; requeued {reason, previous_status, attempt} by recovery or "
                "{attempt, worker, reason, error} by a worker; cancelled {by, from, force}; "
                "retried {by, attempts}."
            ),
        },
    ),
}

# Alembic's own table: not in the models, commented so that every table says what it is.
# Frozen copies of the comments migration 0008 gave the labels (it sets them on
# PostgreSQL and takes them away with its tables): here only for ``audit_columns``, and
# left alone by this migration's downgrade.
LABELS: dict[str, tuple[str, dict[str, str]]] = {
    "task_labels": (
        "One row per label of a task (at most 4), written in its submission's transaction; "
        "none for a task without labels.",
        {
            "task_id": "The labelled task.",
            "label": "prefix:value, as submitted.",
            "account": "The task's account (a copy of tasks.account).",
            "created_at": "The task's creation time (a copy of tasks.created_at).",
        },
    ),
}
TASKS_LABELS = (
    "The task's labels (the API's key), sorted, for its view without a join; NULL when it "
    "has none. task_labels holds them again, one row each, for filtering."
)

ALEMBIC_VERSION = (
    "Alembic's record of the schema revision applied (migrations/versions); one row.",
    {"version_num": "The revision id, e.g. 0008."},
)

_UTC_SECOND = "The UTC second, truncated (PostgreSQL timestamptz; SQLite text YYYY-MM-DD HH:MM:SS)."

# The views' comments (PostgreSQL COMMENT ON; audit_columns on SQLite), columns in order.
VIEWS: dict[str, tuple[str, dict[str, str]]] = {
    "audit_releases_per_second": (
        "Attempts released to ARQ per UTC second and per scope. A release is a queued event, "
        "counted at its task_events.at: the dispatch moment (one event per dispatch, retries "
        "and recoveries included). The limits guarantee that over any T seconds a scope's "
        "releases sum to at most rate*T + burst. Seconds without releases have no row.",
        {
            "second": _UTC_SECOND,
            "scope": "cluster (every release), task:<name>, account:<id> or host:<host> "
            "(downloads): the limit scopes of RELAY_LIMITS.",
            "released": "Attempts released in that second for that scope.",
        },
    ),
    "audit_task_timeline": (
        "Every event of every task with the task's name and account, and the detail's "
        "common fields; a task's history is its rows ordered by event_id.",
        {
            "task_id": "The task (tasks.id).",
            "name": "The task's name.",
            "account": "The task's account.",
            "event_id": "task_events.id: the order of the task's history.",
            "at": "When the transition happened (task_events.at); UTC.",
            "event": "The transition (task_events.event).",
            "attempt": "The attempt it concerns (detail.attempt); NULL when none.",
            "actor": "Who did it: the account that asked (cancelled, retried: detail.by), "
            "the worker (detail.worker), the relay (queued: detail.relay), the submitting "
            "account (submitted); NULL for recovery.",
            "reason": "Why (detail.reason): recovery's or a stopping worker's reason for "
            "requeued or failed; NULL otherwise.",
            "error": "The attempt's error (detail.error); NULL when none.",
            "detail": "The whole detail (JSON), as task_events holds it.",
        },
    ),
    "audit_operator_actions": (
        "Cancels and explicit retries, each with the account that asked for it "
        "(cancelled and retried events).",
        {
            "event_id": "task_events.id.",
            "at": "When it was done; UTC.",
            "action": "cancelled or retried.",
            "task_id": "The task (tasks.id).",
            "name": "The task's name.",
            "account": "The task's account.",
            "asked_by": "The account that asked (detail.by); an admin key may act on another "
            "account's task.",
            "from_status": "Cancels: the status the task was cancelled from (detail.from).",
            "forced": "Cancels: whether it was forced (detail.force): PostgreSQL boolean, "
            "SQLite 1 or 0.",
            "attempts": "Retries: the task's attempts when it was retried (detail.attempts).",
        },
    ),
    "audit_columns": (
        "The comments on every table, view and column, as rows (SQLite has no comments). "
        "Order by table_name, position.",
        {
            "table_name": "The table or view.",
            "column_name": "The column; NULL for the row of the table or view itself.",
            "position": "The column's position, from 1; 0 for the table or view itself.",
            "comment": "What it holds; NULL where no comment was given.",
        },
    ),
}


@dataclass(frozen=True, kw_only=True, slots=True)
class _Sql:
    """The few expressions whose spelling differs between the two databases."""

    text: Callable[[str], str]  # a detail field as text
    integer: Callable[[str], str]  # a detail field as an integer
    boolean: Callable[[str], str]  # a detail field as a boolean (SQLite: 1 or 0)
    second: str  # task_events.at truncated to its UTC second


_DIALECTS = {
    # SQLite keeps detail as JSON text and at as UTC text 'YYYY-MM-DD HH:MM:SS.ffffff'.
    "sqlite": _Sql(
        text=lambda key: f"json_extract(e.detail, '$.{key}')",
        integer=lambda key: f"json_extract(e.detail, '$.{key}')",
        boolean=lambda key: f"json_extract(e.detail, '$.{key}')",
        second="substr(e.at, 1, 19)",
    ),
    # PostgreSQL keeps detail as jsonb and at as timestamptz.
    "postgresql": _Sql(
        text=lambda key: f"(e.detail ->> '{key}')",
        integer=lambda key: f"(e.detail ->> '{key}')::integer",
        boolean=lambda key: f"(e.detail ->> '{key}')::boolean",
        second="date_trunc('second', e.at)",
    ),
}


def _releases(sql: _Sql) -> str:
    return f"""
        WITH releases AS (
            SELECT {sql.second} AS second, t.name, t.account, t.host
            FROM task_events e JOIN tasks t ON t.id = e.task_id
            WHERE e.event = 'queued'
        )
        SELECT second, 'cluster' AS scope, count(*) AS released
        FROM releases GROUP BY second
        UNION ALL
        SELECT second, 'task:' || name, count(*) FROM releases GROUP BY second, name
        UNION ALL
        SELECT second, 'account:' || account, count(*) FROM releases GROUP BY second, account
        UNION ALL
        SELECT second, 'host:' || host, count(*) FROM releases
        WHERE host IS NOT NULL GROUP BY second, host
    """


def _timeline(sql: _Sql) -> str:
    actor = ", ".join(sql.text(key) for key in ("by", "worker", "relay", "account"))
    return f"""
        SELECT e.task_id, t.name, t.account, e.id AS event_id, e.at, e.event,
               {sql.integer("attempt")} AS attempt,
               coalesce({actor}) AS actor,
               {sql.text("reason")} AS reason,
               {sql.text("error")} AS error,
               e.detail
        FROM task_events e JOIN tasks t ON t.id = e.task_id
    """


def _operator_actions(sql: _Sql) -> str:
    return f"""
        SELECT e.id AS event_id, e.at, e.event AS action, e.task_id, t.name, t.account,
               {sql.text("by")} AS asked_by,
               {sql.text("from")} AS from_status,
               {sql.boolean("force")} AS forced,
               {sql.integer("attempts")} AS attempts
        FROM task_events e JOIN tasks t ON t.id = e.task_id
        WHERE e.event IN ('cancelled', 'retried')
    """


# PostgreSQL: the catalog itself, so later comments show without touching this view.
_POSTGRES_COLUMNS = """
    SELECT c.relname::text AS table_name, NULL::text AS column_name, 0 AS position,
           obj_description(c.oid, 'pg_class') AS comment
    FROM pg_class c
    WHERE c.relnamespace = to_regnamespace(current_schema()) AND c.relkind IN ('r', 'p', 'v')
    UNION ALL
    SELECT c.relname::text, a.attname::text, a.attnum::integer, col_description(c.oid, a.attnum)
    FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
    WHERE c.relnamespace = to_regnamespace(current_schema()) AND c.relkind IN ('r', 'p', 'v')
      AND a.attnum > 0 AND NOT a.attisdropped
"""


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _all_comments() -> dict[str, tuple[str, dict[str, str]]]:
    tasks_comment, tasks_columns = TABLES["tasks"]
    tasks = (tasks_comment, {**tasks_columns, "labels": TASKS_LABELS})
    return {**TABLES, "tasks": tasks, **LABELS, "alembic_version": ALEMBIC_VERSION, **VIEWS}


def _sqlite_columns() -> str:
    """The frozen comments joined to SQLite's real tables, views and columns."""
    rows = []
    for table, (table_comment, columns) in _all_comments().items():
        rows.append(f"({_quote(table)}, '', {_quote(table_comment)})")
        rows += [f"({_quote(table)}, {_quote(c)}, {_quote(text)})" for c, text in columns.items()]
    values = ",\n            ".join(rows)
    # '' stands for the table itself in the join; the view shows NULL there.
    return f"""
        WITH comments(table_name, column_name, comment) AS (
            VALUES {values}
        ),
        relations AS (
            SELECT name FROM sqlite_master
            WHERE type IN ('table', 'view') AND substr(name, 1, 7) <> 'sqlite_'
        )
        SELECT r.name AS table_name, NULL AS column_name, 0 AS position, c.comment
        FROM relations r
        LEFT JOIN comments c ON c.table_name = r.name AND c.column_name = ''
        UNION ALL
        SELECT r.name, p.name, p.cid + 1, c.comment
        FROM relations r JOIN pragma_table_info(r.name) p
        LEFT JOIN comments c ON c.table_name = r.name AND c.column_name = p.name
    """


def _views(dialect: str) -> dict[str, str]:
    sql = _DIALECTS[dialect]
    return {
        "audit_releases_per_second": _releases(sql),
        "audit_task_timeline": _timeline(sql),
        "audit_operator_actions": _operator_actions(sql),
        "audit_columns": _POSTGRES_COLUMNS if dialect == "postgresql" else _sqlite_columns(),
    }


def _execute(statement: str) -> None:
    # Through the connection, not op.execute's text(): a colon in a comment ("task:<name>")
    # must not be read as a bind parameter, and nothing here takes parameters.
    op.get_bind().exec_driver_sql(statement)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name, body in _views(dialect).items():
        _execute(f"CREATE VIEW {name} AS {body}")
    if dialect != "postgresql":
        return
    for table, (comment, columns) in _all_comments().items():
        kind = "VIEW" if table in VIEWS else "TABLE"
        _execute(f"COMMENT ON {kind} {table} IS {_quote(comment)}")
        for column, text in columns.items():
            _execute(f"COMMENT ON COLUMN {table}.{column} IS {_quote(text)}")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name in reversed(list(VIEWS)):
        _execute(f"DROP VIEW {name}")
    if dialect != "postgresql":
        return
    for table, (_, columns) in {**TABLES, "alembic_version": ALEMBIC_VERSION}.items():
        _execute(f"COMMENT ON TABLE {table} IS NULL")
        for column in columns:
            _execute(f"COMMENT ON COLUMN {table}.{column} IS NULL")
