"""Insert submissions: a task row, its outbox row and its ``submitted`` event per new task.

``Intake`` is the seam; ``CoreIntake`` the reference in portable SQLAlchemy Core (one
multi-row INSERT per table); ``open_intake`` returns it or a dialect's fast path
(``throttler.store.sqlite_intake``, ``throttler.store.postgres_intake``), each checked
against it row by row in tests/integration/store/test_intake_parity.py.

Idempotency keys: the tasks INSERT skips a row whose (account, idempotency_key) is
taken (ON CONFLICT DO NOTHING on the unique index, so two concurrent requests, or two
in one batch, can never both insert); the keyed rows are then read back, and a task
whose key is bound to another task gets neither outbox row nor event, and is reported
as ``Existing`` (``resolve_keys``) with the bound task's view as that read found it, which
a replay answers with. A submission with a key bound to a different request
that has other tasks inserted raises ``KeyReusedError``: the transaction is rolled back
(the group committer then writes each of the batch's submissions alone), so a bulk
request stays all or none.

Labels (``NewTask.labels``): the task row carries them (``tasks.labels``) and each gets a
``task_labels`` row, for inserted tasks only; a batch without labels runs no statement
for them (the hot path stays what it was).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from sqlalchemy import Table, insert, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from throttler.models import OutboxEntry, Task, TaskEvent, TaskLabel
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus
from throttler.store.reads import VIEW_COLUMNS, TaskView, task_view
from throttler.submit import NewTask

T = TypeVar("T")
TASKS = cast(Table, Task.__table__)
OUTBOX = cast(Table, OutboxEntry.__table__)
EVENTS = cast(Table, TaskEvent.__table__)
LABELS = cast(Table, TaskLabel.__table__)

# Rows per INSERT statement at most: well within every driver's limit on parameters
# (32,767 for asyncpg, 32,766 for SQLite) at ten columns a row.
MAX_ROWS_PER_STATEMENT = 1000


@dataclass(frozen=True, kw_only=True, slots=True)
class Existing:
    """A submitted task not inserted: its idempotency key is bound to ``task_id``."""

    task_id: str
    # The key came with the same request (a replay) or a different one (a 422).
    same_request: bool
    # The bound task as the intake's transaction read it back: a replay answers with it
    # rather than read the task a second time (which held a replay to 0.13-0.27x the rate
    # of a plain submit).
    view: TaskView


# Per task of a submission, in its order: None where inserted.
Outcome = list[Existing | None]


class KeyReusedError(Exception):
    """A submission reused idempotency keys for different requests: nothing of it written."""

    def __init__(self, indexes: Sequence[int]) -> None:
        super().__init__(f"idempotency key reused for a different request: items {indexes}")
        self.indexes = list(indexes)


def reused_indexes(outcome: Outcome) -> list[int]:
    """The tasks whose key is bound to a different request."""
    return [index for index, held in enumerate(outcome) if held and not held.same_request]


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyHolder:
    """The task an (account, idempotency key) is bound to, as read back after the INSERT."""

    request_hash: str | None
    view: TaskView


# (account, idempotency_key) -> the task holding it
Bound = dict[tuple[str, str], KeyHolder]
# What the read-back selects: the key, the request hash, and the holder's whole view.
BOUND_COLUMNS = (TASKS.c.account, TASKS.c.idempotency_key, TASKS.c.request_hash, *VIEW_COLUMNS)


def keyed_pairs(tasks: Sequence[NewTask]) -> list[tuple[str, str]]:
    return [(task.account, task.idempotency_key) for task in tasks if task.idempotency_key]


def resolve_keys(
    submissions: Sequence[Sequence[NewTask]], bound: Bound
) -> tuple[list[Outcome], list[NewTask]]:
    """Each submission's outcome, and the tasks actually inserted (which need outbox rows
    and events), from the keys' rows as read back after the tasks INSERT.

    Raises ``KeyReusedError`` for a submission that reused a key for another request and
    had tasks inserted: they must not stay (all or none).
    """
    outcomes: list[Outcome] = []
    inserted: list[NewTask] = []
    for tasks in submissions:
        outcome: Outcome = []
        for task in tasks:
            holder = None
            if task.idempotency_key:
                holder = bound.get((task.account, task.idempotency_key))
            if holder is None or holder.view.task_id == task.task_id:
                outcome.append(None)
            else:
                outcome.append(
                    Existing(
                        task_id=holder.view.task_id,
                        same_request=holder.request_hash == task.request_hash,
                        view=holder.view,
                    )
                )
        reused = [
            index
            for index, existing in enumerate(outcome)
            if existing and not existing.same_request
        ]
        if reused and None in outcome:
            raise KeyReusedError(reused)
        outcomes.append(outcome)
        inserted.extend(task for task, existing in zip(tasks, outcome, strict=True) if not existing)
    return outcomes, inserted


@dataclass(frozen=True, kw_only=True, slots=True)
class Submission:
    """One request's tasks, written together or not at all.

    ``rows`` is an implementation's own form of them, made by ``Intake.prepare`` when the
    request arrives (on the event loop), so that the batch's transaction only executes.
    """

    tasks: Sequence[NewTask]
    rows: object = None


class Intake(Protocol):
    """Where accepted tasks are written."""

    # How many batches a writer may hand to ``insert`` before the first has committed:
    # more than one where they queue for one thread of the intake's own (SQLite).
    @property
    def batches_in_flight(self) -> int: ...

    def prepare(self, tasks: Sequence[NewTask]) -> Submission:
        """Ready ``tasks`` for ``insert`` (conversions that need no database)."""
        ...

    async def insert(self, take: Callable[[], Sequence[Submission]]) -> list[Outcome]:
        """Write the submissions ``take()`` returns in ONE transaction; return once committed
        each one's outcome, in ``take()``'s order.

        ``take`` is called once, as the transaction begins (on whatever thread runs it):
        a group committer's batch may grow until then. Raises SQLAlchemy's exception for
        a failed transaction (nothing of it written), ``KeyReusedError`` as
        ``resolve_keys`` says.
        """
        ...

    async def close(self) -> None:
        """Release what the intake opened itself (not the engine)."""
        ...


def task_row(task: NewTask) -> dict[str, Any]:
    return {
        "id": task.task_id,
        "name": task.name,
        "account": task.account,
        "payload": dict(task.payload),
        "host": task.host,
        "status": TaskStatus.PENDING.value,
        "priority": task.priority,
        "attempts": 0,
        "created_at": task.created_at,
        "run_at": task.run_at,
        "idempotency_key": task.idempotency_key,
        "request_hash": task.request_hash,
        # NULL, not an empty array, without labels (throttler.models.LabelsDocument).
        "labels": list(task.labels) if task.labels else None,
    }


def outbox_row(task: NewTask) -> dict[str, Any]:
    return {"task_id": task.task_id, "created_at": task.created_at}


def event_row(task: NewTask) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "at": task.created_at,
        "event": EventKind.SUBMITTED.value,
        "detail": {"account": task.account},
    }


def label_rows(task: NewTask) -> list[dict[str, Any]]:
    """The task's ``task_labels`` rows: none without labels."""
    return [
        {
            "task_id": task.task_id,
            "label": label,
            "account": task.account,
            "created_at": task.created_at,
        }
        for label in task.labels
    ]


def _chunks(items: Sequence[T], size: int = MAX_ROWS_PER_STATEMENT) -> list[Sequence[T]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


async def bound_keys(
    executor: AsyncConnection | AsyncSession, pairs: Sequence[tuple[str, str]]
) -> Bound:
    """The task each (account, key) is bound to now, with its request hash and view."""
    bound: Bound = {}
    for chunk in _chunks(pairs):
        rows = await executor.execute(
            select(*BOUND_COLUMNS).where(
                tuple_(TASKS.c.account, TASKS.c.idempotency_key).in_(list(chunk))
            )
        )
        for row in rows:
            bound[(row.account, row.idempotency_key)] = KeyHolder(
                request_hash=row.request_hash, view=task_view(row)
            )
    return bound


def _insert_tasks(dialect: str) -> Any:
    """INSERT INTO tasks skipping a row whose key is taken (dialect-specific syntax)."""
    if dialect == "postgresql":
        statement: Any = postgresql.insert(TASKS)
    elif dialect == "sqlite":
        statement = sqlite.insert(TASKS)
    else:
        raise NotImplementedError(f"idempotency keys need ON CONFLICT: not on {dialect}")
    return statement.on_conflict_do_nothing(index_elements=IDEMPOTENCY_INDEX)


# The unique index an idempotency key conflicts on (throttler.models.Task).
IDEMPOTENCY_INDEX = ["account", "idempotency_key"]


async def insert_submissions(
    executor: AsyncConnection | AsyncSession, tasks: Sequence[NewTask]
) -> Outcome:
    """The reference for one submission (``insert_batch``); its outcome."""
    [outcome] = await insert_batch(executor, [tasks])
    return outcome


async def insert_batch(
    executor: AsyncConnection | AsyncSession, submissions: Sequence[Sequence[NewTask]]
) -> list[Outcome]:
    """The reference: insert the submissions' tasks in the caller's transaction, one
    multi-row INSERT per table (per ``MAX_ROWS_PER_STATEMENT`` rows), outbox ids in
    submission order; a task whose key is taken gets no rows (``resolve_keys``), and
    ``task_labels`` only when some inserted task has labels."""
    tasks = [task for submission in submissions for task in submission]
    pairs = keyed_pairs(tasks)
    bound: Bound = {}
    if pairs:
        bind = executor if isinstance(executor, AsyncConnection) else executor.get_bind()
        dialect = bind.dialect.name
        for chunk in _chunks(tasks):
            await executor.execute(_insert_tasks(dialect).values([task_row(t) for t in chunk]))
        bound = await bound_keys(executor, pairs)
    else:
        for chunk in _chunks(tasks):
            await executor.execute(insert(TASKS).values([task_row(task) for task in chunk]))
    outcomes, inserted = resolve_keys(submissions, bound)
    for table, row in ((OUTBOX, outbox_row), (EVENTS, event_row)):
        for chunk in _chunks(inserted):
            await executor.execute(insert(table).values([row(task) for task in chunk]))
    labels = [row for task in inserted if task.labels for row in label_rows(task)]
    for rows in _chunks(labels):
        await executor.execute(insert(LABELS).values(list(rows)))
    return outcomes


class CoreIntake:
    """The reference intake: each batch a transaction on a connection of ``engine``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @property
    def batches_in_flight(self) -> int:
        # One at a time: a second would take a second connection and commit out of order.
        return 1

    def prepare(self, tasks: Sequence[NewTask]) -> Submission:
        return Submission(tasks=tasks)

    async def insert(self, take: Callable[[], Sequence[Submission]]) -> list[Outcome]:
        submissions = [submission.tasks for submission in take()]
        if not any(submissions):
            return [[] for _ in submissions]
        async with self._engine.begin() as connection:
            return await self.insert_in(connection, submissions)

    async def insert_in(
        self, connection: AsyncConnection, submissions: Sequence[Sequence[NewTask]]
    ) -> list[Outcome]:
        """Insert the submissions in ``connection``'s transaction (overridden by fast paths)."""
        return await insert_batch(connection, submissions)

    async def close(self) -> None:
        """Nothing of its own: the engine belongs to the caller."""


def open_intake(settings: Settings, engine: AsyncEngine) -> Intake:
    """The intake for ``DATABASE_URL``: its dialect's fast path where one pays."""
    if settings.is_sqlite:
        from throttler.store.sqlite_intake import SQLiteIntake

        return SQLiteIntake(settings, engine)
    if engine.dialect.name == "postgresql":
        from throttler.store.postgres_intake import PostgresIntake

        return PostgresIntake(engine)
    return CoreIntake(engine)
