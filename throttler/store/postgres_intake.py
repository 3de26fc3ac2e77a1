"""PostgreSQL's intake: the three inserts (four with labels) as one statement fed by arrays,
one round trip.

Each round trip is a wait behind the API's busy event loop; the reference's three (or
more) statements measured slower under load than this one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from throttler.statuses import EventKind, TaskStatus
from throttler.store.intake import (
    Bound,
    CoreIntake,
    Outcome,
    bound_keys,
    keyed_pairs,
    resolve_keys,
)
from throttler.submit import NewTask

# Data-modifying CTEs all run, and the foreign keys are checked at the end of the
# statement, so the outbox and event rows may come from the same arrays rather than from
# tasks' RETURNING (whose order is not defined): ORDER BY keeps the outbox ids in
# submission order, as the reference's inserts do. A task whose idempotency key is taken
# is skipped (ON CONFLICT DO NOTHING) and, missing from new_tasks' RETURNING, gets no
# outbox row or event; which task holds each key is read by a second statement, which
# sees rows that a concurrent transaction committed while this one waited on the index.
# The statement, with or without labels: a batch without any runs the one that never
# mentions them (tasks.labels stays NULL by default), so labels cost it nothing.
_SUBMITTED = """
    WITH submitted AS (
        SELECT * FROM unnest(
            CAST(:ids AS varchar[]), CAST(:names AS varchar[]), CAST(:accounts AS varchar[]),
            CAST(:payloads AS text[]), CAST(:hosts AS varchar[]),
            CAST(:priorities AS smallint[]), CAST(:created AS timestamptz[]),
            CAST(:run_at AS timestamptz[]), CAST(:keys AS varchar[]),
            CAST(:hashes AS varchar[]){label_array}
        ) WITH ORDINALITY
        AS s(id, name, account, payload, host, priority, created_at, run_at,
            idempotency_key, request_hash{label_column}, n)
    ), new_tasks AS (
        INSERT INTO tasks
            (id, name, account, payload, host, status, priority, attempts, created_at, run_at,
            idempotency_key, request_hash{label_column})
        SELECT id, name, account, CAST(payload AS jsonb), host, :pending, priority, 0,
            created_at, run_at, idempotency_key, request_hash{label_value}
        FROM submitted ORDER BY n
        ON CONFLICT (account, idempotency_key) DO NOTHING
        RETURNING id
    ), inserted AS (
        SELECT s.* FROM submitted s JOIN new_tasks USING (id)
    ), new_outbox AS (
        INSERT INTO outbox (task_id, created_at)
        SELECT id, created_at FROM inserted ORDER BY n
    ){label_insert}
    INSERT INTO task_events (task_id, at, event, detail)
    SELECT id, created_at, :event, jsonb_build_object('account', account)
    FROM inserted ORDER BY n
    """
_SUBMIT = text(_SUBMITTED.format(label_array="", label_column="", label_value="", label_insert=""))
# Label rows come from their own arrays (a task has 0 to 4), joined to the inserted tasks:
# a task whose idempotency key was taken gets none.
_SUBMIT_LABELLED = text(
    _SUBMITTED.format(
        label_array=", CAST(:labels AS text[])",
        label_column=", labels",
        label_value=", CAST(labels AS jsonb)",
        label_insert=""", new_labels AS (
        INSERT INTO task_labels (task_id, label, account, created_at)
        SELECT l.task_id, l.label, s.account, s.created_at
        FROM unnest(CAST(:label_tasks AS varchar[]), CAST(:label_values AS varchar[]))
            AS l(task_id, label)
        JOIN inserted s ON s.id = l.task_id
    )""",
    )
)


def _parameters(tasks: Sequence[NewTask]) -> dict[str, Any]:
    return {
        "ids": [task.task_id for task in tasks],
        "names": [task.name for task in tasks],
        "accounts": [task.account for task in tasks],
        "payloads": [json.dumps(dict(task.payload)) for task in tasks],
        "hosts": [task.host for task in tasks],
        "priorities": [task.priority for task in tasks],
        "created": [task.created_at for task in tasks],
        "run_at": [task.run_at for task in tasks],
        "keys": [task.idempotency_key for task in tasks],
        "hashes": [task.request_hash for task in tasks],
        "pending": TaskStatus.PENDING.value,
        "event": EventKind.SUBMITTED.value,
    }


def _labelled_parameters(tasks: Sequence[NewTask]) -> dict[str, Any]:
    labelled = [(task.task_id, label) for task in tasks for label in task.labels]
    return {
        **_parameters(tasks),
        "labels": [json.dumps(list(task.labels)) if task.labels else None for task in tasks],
        "label_tasks": [task_id for task_id, _ in labelled],
        "label_values": [label for _, label in labelled],
    }


class PostgresIntake(CoreIntake):
    """The reference, with its inserts as one ``unnest`` statement."""

    async def insert_in(
        self, connection: AsyncConnection, submissions: Sequence[Sequence[NewTask]]
    ) -> list[Outcome]:
        tasks = [task for submission in submissions for task in submission]
        if any(task.labels for task in tasks):
            await connection.execute(_SUBMIT_LABELLED, _labelled_parameters(tasks))
        else:
            await connection.execute(_SUBMIT, _parameters(tasks))
        pairs = keyed_pairs(tasks)
        bound: Bound = await bound_keys(connection, pairs) if pairs else {}
        outcomes, _ = resolve_keys(submissions, bound)
        return outcomes
