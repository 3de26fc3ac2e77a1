"""ORM classes: tasks, task_labels, outbox, task_events, limit_rules and limit_changes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from throttler.labels import LABEL_MAX_LENGTH
from throttler.statuses import EventKind, TaskStatus

# Fixed constraint names keep Alembic migrations identical on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on PostgreSQL (indexable, compact), plain JSON text elsewhere.
JSONDocument = JSON().with_variant(JSONB(), "postgresql")
# A task's labels: SQL NULL when it has none (not JSON null), so a submission without
# labels writes nothing more than before they existed.
LabelsDocument = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
# Integer ids autoincrement on SQLite only when declared INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")

TASK_ID_LENGTH = 36
TASK_NAME_LENGTH = 64
ACCOUNT_LENGTH = 128
HOST_LENGTH = 253
IDEMPOTENCY_KEY_LENGTH = 255
REQUEST_HASH_LENGTH = 64  # a SHA-256 in hex (throttler.submit.request_digest)

# Every table and column carries a comment for the auditor who reads the database directly
# (PostgreSQL: \d+ in psql; SQLite has no comments, so the view audit_columns lists them).
# Migration 0008 holds frozen copies; tests/integration/test_audit_sql.py keeps them equal.
_UTC = " UTC (PostgreSQL timestamptz; SQLite text YYYY-MM-DD HH:MM:SS.ffffff, UTC, no offset)."


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every dialect (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: timestamps must carry a timezone")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _status_check(column: str, values: type[TaskStatus] | type[EventKind]) -> str:
    allowed = ", ".join(f"'{member.value}'" for member in values)
    return f"{column} IN ({allowed})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Task(Base):
    """One accepted task: its request, where it is, and how it ended."""

    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(_status_check("status", TaskStatus), name="status"),
        CheckConstraint("priority BETWEEN 0 AND 9", name="priority"),
        Index("ix_tasks_status_name", "status", "name"),
        # The task list's newest-first order (throttler.store.reads.page_statement): without
        # a filter, with a status, with a name (and a status: one range per status).
        Index("ix_tasks_account_created_at_id", "account", "created_at", "id"),
        Index("ix_tasks_account_status_created_at_id", "account", "status", "created_at", "id"),
        Index(
            "ix_tasks_account_name_status_created_at_id",
            "account",
            "name",
            "status",
            "created_at",
            "id",
        ),
        Index("ix_tasks_status_host", "status", "host"),
        # An idempotency key names one task per account: the intake's inserts skip a
        # second row on this index (ON CONFLICT DO NOTHING) rather than check first.
        # Rows without a key are NULL here, and NULLs never conflict.
        Index("ix_tasks_account_idempotency_key", "account", "idempotency_key", unique=True),
        {
            "comment": "One row per accepted task: its request, where it is now and how it "
            "ended. Inserted by the API with its outbox row and submitted event; then changed "
            "by the relay (queued), workers (running, outcomes), recovery and explicit "
            "retries; deleted only by retention (RETENTION_DAYS), with its events. Its "
            "history: task_events."
        },
    )

    id: Mapped[str] = mapped_column(
        String(TASK_ID_LENGTH),
        primary_key=True,
        comment="Task id, a UUID4 chosen by the API. Each ARQ job id is <id>@<release moment "
        "in microseconds since the epoch> (one per dispatch).",
    )
    name: Mapped[str] = mapped_column(
        String(TASK_NAME_LENGTH),
        comment="Task name: the function a worker runs (greeting, download, ...). Limit "
        "scope task:<name>.",
    )
    account: Mapped[str] = mapped_column(
        String(ACCOUNT_LENGTH),
        comment="Account that submitted the task: its API key's account, or 'default' when "
        "API_KEYS is unset. Limit scope account:<id>.",
    )
    payload: Mapped[dict[str, Any]] = mapped_column(
        JSONDocument, comment="The task's input (JSON) as submitted; never changed."
    )
    # The hostname a download contacts, for ``host:`` limits; None for other tasks.
    host: Mapped[str | None] = mapped_column(
        String(HOST_LENGTH),
        nullable=True,
        comment="Host a download contacts, canonical (lower case; an IP address in one "
        "spelling, IPv6 in brackets). Limit scope host:<host>. NULL for other tasks.",
    )
    status: Mapped[str] = mapped_column(
        String(16),
        comment="Where the task is: pending (in the outbox), queued (released to ARQ), "
        "running, succeeded, failed or cancelled (the last three final; only an explicit "
        "retry takes failed or cancelled back to pending).",
    )
    priority: Mapped[int] = mapped_column(
        SmallInteger,
        default=5,
        server_default="5",
        comment="0 to 9, set at submission (default 5): the relay releases an account's "
        "pending tasks by priority, higher first, then age.",
    )
    attempts: Mapped[int] = mapped_column(
        Integer,
        default=0,
        server_default="0",
        comment="Attempts started, every one counted (first, retries, recoveries, explicit "
        "retries); a worker adds 1 when it starts one.",
    )
    # ``attempts`` when the task was last explicitly retried (0 if never): the attempts
    # after it are the ones a worker counts against the task's tries (throttler.store.retries).
    tries_base: Mapped[int] = mapped_column(
        Integer,
        default=0,
        server_default="0",
        comment="attempts when the task was last explicitly retried (0 if never): a worker "
        "counts only the attempts after it against the task's tries (WORKER_MAX_TRIES).",
    )
    result: Mapped[dict[str, Any] | None] = mapped_column(
        JSONDocument,
        nullable=True,
        comment="The task's result (JSON), written by the worker when it succeeded; NULL "
        "otherwise (an explicit retry clears it).",
    )
    error: Mapped[str | None] = mapped_column(
        Text,
        nullable=True,
        comment="Error of the last failed or retrying attempt, or recovery's; NULL after a "
        "success and after an explicit retry (task_events keeps every error).",
    )
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, comment="When the API accepted the task." + _UTC
    )
    run_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime,
        nullable=True,
        comment="Earliest moment the relay may release the next attempt: the submission's "
        "delay, a retry's backoff, an explicit retry's moment; NULL means at once." + _UTC,
    )
    queued_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime,
        nullable=True,
        comment="Release moment of the latest dispatch to ARQ, set by the relay (the job "
        "starts no earlier; each release is also a queued event at this moment); NULL once "
        "recovery puts the task back in the outbox." + _UTC,
    )
    started_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, nullable=True, comment="When a worker started the latest attempt." + _UTC
    )
    finished_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime,
        nullable=True,
        comment="When the task became succeeded, failed or cancelled; NULL while not final "
        "(an explicit retry clears it)." + _UTC,
    )
    idempotency_key: Mapped[str | None] = mapped_column(
        String(IDEMPOTENCY_KEY_LENGTH),
        nullable=True,
        comment="The client's Idempotency-Key (header, or a bulk item's idempotency_key), "
        "unique within the account; NULL without one.",
    )
    request_hash: Mapped[str | None] = mapped_column(
        String(REQUEST_HASH_LENGTH),
        nullable=True,
        comment="SHA-256 (hex) of the request the idempotency key came with: a repeat with "
        "another request under the same key is refused. NULL without a key.",
    )
    labels: Mapped[list[str] | None] = mapped_column(
        LabelsDocument,
        nullable=True,
        comment="The task's labels (the API's key), sorted, for its view without a join; "
        "NULL when it has none. task_labels holds them again, one row each, for filtering.",
    )


# The claim order (throttler.store.outbox): each account's pending tasks by priority, then age.
# Partial, so it holds only the backlog however many tasks have finished.
Index(
    "ix_tasks_pending_turn",
    Task.account,
    Task.priority.desc(),
    Task.created_at,
    sqlite_where=text("status = 'pending'"),
    postgresql_where=text("status = 'pending'"),
)


class TaskLabel(Base):
    """One label of a task, written with it: what a filter by label reads (throttler.labels)."""

    __tablename__ = "task_labels"
    __table_args__ = (
        # An account's tasks with one label, newest first: GET /tasks?key= reads a keyset
        # range of it backwards (throttler.store.reads.page_statement), and key: limit
        # rules can find a label's tasks from it.
        Index(
            "ix_task_labels_account_label_created_at_task_id",
            "account",
            "label",
            "created_at",
            "task_id",
        ),
        {
            "comment": "One row per label of a task (at most 4), written in its submission's "
            "transaction; none for a task without labels."
        },
    )

    task_id: Mapped[str] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"),
        primary_key=True,
        comment="The labelled task.",
    )
    label: Mapped[str] = mapped_column(
        String(LABEL_MAX_LENGTH), primary_key=True, comment="prefix:value, as submitted."
    )
    # Copies of the task's own (never changed after submission), so that the index above
    # holds the whole filter and order.
    account: Mapped[str] = mapped_column(
        String(ACCOUNT_LENGTH), comment="The task's account (a copy of tasks.account)."
    )
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, comment="The task's creation time (a copy of tasks.created_at)."
    )


class OutboxEntry(Base):
    """A task waiting for the relay; deleted once the task is safely in ARQ."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_claimed_until", "claimed_until"),
        {
            "comment": "Tasks waiting for the relay, one row per trip through the outbox "
            "(submission, retry, recovery, explicit retry). A relay leases rows, marks their "
            "tasks queued, hands them to ARQ, then deletes the rows."
        },
    )

    # Autoincrement id gives FIFO order without trusting clocks.
    id: Mapped[int] = mapped_column(
        BigId,
        primary_key=True,
        autoincrement=True,
        comment="Insertion order: the last tie-break of the claim order (priority, age).",
    )
    task_id: Mapped[str] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"),
        unique=True,
        comment="The waiting task (tasks.id); one row per task at most.",
    )
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime, comment="When the row was written." + _UTC
    )
    # A relay that claimed the row and is handing it to ARQ; expired leases are re-claimed.
    claimed_by: Mapped[str | None] = mapped_column(
        String(64),
        nullable=True,
        comment="Id of the relay that leased the row and is handing its task to ARQ; NULL "
        "while unclaimed.",
    )
    claimed_until: Mapped[datetime | None] = mapped_column(
        UTCDateTime,
        nullable=True,
        comment="End of that lease: after it another relay may take the row (a crashed "
        "relay's claims)." + _UTC,
    )


class TaskEvent(Base):
    """Append-only history: one row per transition, never updated."""

    __tablename__ = "task_events"
    __table_args__ = (
        CheckConstraint(_status_check("event", EventKind), name="event"),
        Index("ix_task_events_task_id_id", "task_id", "id"),
        Index("ix_task_events_event_at", "event", "at"),
        {
            "comment": "The audit trail: one row per transition of a task, appended in the "
            "transaction that makes it. Never updated, except that a relay moves a queued "
            "event it has not yet handed to ARQ to its later release moment; deleted only "
            "with its task, by retention. Views: audit_task_timeline, "
            "audit_releases_per_second, audit_operator_actions."
        },
    )

    id: Mapped[int] = mapped_column(
        BigId,
        primary_key=True,
        autoincrement=True,
        comment="Append order: a task's events by id are its history.",
    )
    task_id: Mapped[str] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), comment="The task (tasks.id)."
    )
    at: Mapped[datetime] = mapped_column(
        UTCDateTime,
        comment="When the transition happened; for queued, the release moment (the job "
        "starts no earlier; equals tasks.queued_at of that dispatch)." + _UTC,
    )
    event: Mapped[str] = mapped_column(
        String(16),
        comment="submitted (API), queued (relay released it to ARQ), started, retrying, "
        "succeeded, failed (worker, or recovery), cancelled, requeued (back in the outbox "
        "by recovery or a stopping worker), retried (an explicit retry).",
    )
    detail: Mapped[dict[str, Any]] = mapped_column(
        JSONDocument,
        default=dict,
        comment="JSON by event: submitted {account}; queued {relay}; started {attempt, "
        "worker}; retrying {attempt, worker, error, defer_s}; succeeded {attempt, worker}; "
        "failed {attempt, worker, error} or by recovery {reason, previous_status, attempt, "
        "error}; requeued {reason, previous_status, attempt} by recovery or {attempt, worker, "
        "reason, error} by a worker; cancelled {by, from, force}; retried {by, attempts}.",
    )


SCOPE_LENGTH = 300  # "host:" and a 253-character host name, with room
LIMIT_CHANGES = ("set", "delete", "pause", "resume")
LIMIT_CHANGE_REASONS = ("api", "upstream")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class LimitOverride(Base):
    """A rule or pause set through the API, in force on every relay over RELAY_LIMITS."""

    __tablename__ = "limit_rules"
    __table_args__ = (
        CheckConstraint("rate_per_s > 0", name="rate_per_s"),
        CheckConstraint("burst >= 1", name="burst"),
        CheckConstraint("inflight >= 1", name="inflight"),
        {
            "comment": "Limits set through the API (PUT /limits/{scope}, pause): one row per "
            "scope, overriding the RELAY_LIMITS rule of that scope on every relay within 1 s. "
            "The environment's rules are not rows (each process reads them at start). A row "
            "with rate_per_s and inflight both NULL carries only a pause. Every change is also "
            "a row of limit_changes."
        },
    )

    scope: Mapped[str] = mapped_column(
        String(SCOPE_LENGTH),
        primary_key=True,
        comment="The scope as a rule names it: cluster, task:<name>, account:<id>, "
        "host:<host> (canonical), or * in place of a value.",
    )
    rate_per_s: Mapped[float | None] = mapped_column(
        Float, nullable=True, comment="Tasks per second of the token bucket; NULL: no rate."
    )
    burst: Mapped[int | None] = mapped_column(
        Integer, nullable=True, comment="Depth of that bucket (>= 1); NULL without a rate."
    )
    inflight: Mapped[int | None] = mapped_column(
        Integer, nullable=True, comment="Cap on the scope's tasks queued or running; NULL: none."
    )
    paused_until: Mapped[datetime | None] = mapped_column(
        UTCDateTime,
        nullable=True,
        comment="Nothing of the scope is released before this moment; NULL or past: not "
        "paused." + _UTC,
    )
    updated_at: Mapped[datetime] = mapped_column(
        UTCDateTime, comment="When the row last changed." + _UTC
    )
    updated_by: Mapped[str] = mapped_column(
        String(ACCOUNT_LENGTH),
        comment="Who changed it last: the account of the API key (limit_changes.by).",
    )


class LimitChange(Base):
    """Append-only history of limits: one row per change, never updated."""

    __tablename__ = "limit_changes"
    __table_args__ = (
        CheckConstraint(_one_of("change", LIMIT_CHANGES), name="change"),
        CheckConstraint(_one_of("reason", LIMIT_CHANGE_REASONS), name="reason"),
        {
            "comment": "The history of limits set through the API: one row per change (set, "
            "delete, pause, resume), appended in the transaction that makes it; never updated. "
            "Relays reload the rules when max(id) moves."
        },
    )

    id: Mapped[int] = mapped_column(
        BigId, primary_key=True, autoincrement=True, comment="Append order."
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, comment="When it was changed." + _UTC)
    scope: Mapped[str] = mapped_column(
        String(SCOPE_LENGTH), comment="The scope changed (limit_rules.scope)."
    )
    change: Mapped[str] = mapped_column(
        String(16),
        comment="set (PUT), delete (DELETE: the environment's rule is in force again), "
        "pause, resume.",
    )
    before: Mapped[dict[str, Any] | None] = mapped_column(
        JSONDocument,
        nullable=True,
        comment="The scope's limit_rules row before (JSON: rate_per_s, burst, inflight, "
        "paused_until); NULL when there was none.",
    )
    after: Mapped[dict[str, Any] | None] = mapped_column(
        JSONDocument,
        nullable=True,
        comment="The row after, same shape; NULL when it was removed.",
    )
    reason: Mapped[str] = mapped_column(
        String(16), comment="api (an admin's request) or upstream (a 429/503 Retry-After)."
    )
    by: Mapped[str] = mapped_column(
        String(ACCOUNT_LENGTH), comment="Who: the account of the API key, or the task id."
    )
