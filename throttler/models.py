"""ORM classes for the tables: tasks, task_labels, outbox and task_events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
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
    )

    id: Mapped[str] = mapped_column(String(TASK_ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(TASK_NAME_LENGTH))
    account: Mapped[str] = mapped_column(String(ACCOUNT_LENGTH))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    # The hostname a download contacts, for ``host:`` limits; None for other tasks.
    host: Mapped[str | None] = mapped_column(String(HOST_LENGTH), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(SmallInteger, default=5, server_default="5")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # ``attempts`` when the task was last explicitly retried (0 if never): the attempts
    # after it are the ones a worker counts against the task's tries (throttler.store.retries).
    tries_base: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    run_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(
        String(IDEMPOTENCY_KEY_LENGTH), nullable=True
    )
    request_hash: Mapped[str | None] = mapped_column(String(REQUEST_HASH_LENGTH), nullable=True)
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
    __table_args__ = (Index("ix_outbox_claimed_until", "claimed_until"),)

    # Autoincrement id gives FIFO order without trusting clocks.
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # A relay that claimed the row and is handing it to ARQ; expired leases are re-claimed.
    claimed_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class TaskEvent(Base):
    """Append-only history: one row per transition, never updated."""

    __tablename__ = "task_events"
    __table_args__ = (
        CheckConstraint(_status_check("event", EventKind), name="event"),
        Index("ix_task_events_task_id_id", "task_id", "id"),
        Index("ix_task_events_event_at", "event", "at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    event: Mapped[str] = mapped_column(String(16))
    detail: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)
