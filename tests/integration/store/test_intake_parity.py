"""The intake's fast paths write exactly the reference's rows, on SQLite and PostgreSQL.

The same submissions go through ``CoreIntake`` (the portable reference) and through
the dialect's override (``open_intake``), each into the same emptied database; every
column of every row they touch (ids and times included) is compared as the database
holds it, unparsed: SQLite's text, PostgreSQL's values as the driver returns them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.settings import Settings
from throttler.store.intake import CoreIntake, Intake, KeyReusedError, open_intake
from throttler.store.reads import open_reads
from throttler.submit import NewTask, new_task_id

# Every table an intake or attempts batch writes, with the order its rows are read in.
TABLES = {"tasks": "id", "task_labels": "task_id, label", "outbox": "id", "task_events": "id"}
Rows = dict[str, list[tuple[Any, ...]]]

NOW = datetime(2026, 11, 28, 9, 0, 0, 123456, tzinfo=UTC)


async def stored_rows(engine: AsyncEngine) -> Rows:
    """Every column of every row, as the database holds it (no type processing)."""
    async with engine.connect() as connection:
        return {
            table: [
                tuple(row)
                for row in await connection.exec_driver_sql(f"SELECT * FROM {table} ORDER BY {key}")
            ]
            for table, key in TABLES.items()
        }


async def empty_tables(engine: AsyncEngine) -> None:
    """Delete every row and restart the ids, so a second run gets the first run's ids."""
    async with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            await connection.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY"))
            return
        for table in reversed(TABLES):
            await connection.exec_driver_sql(f"DELETE FROM {table}")
        # INTEGER PRIMARY KEY without AUTOINCREMENT restarts at 1 on its own; with it,
        # sqlite_sequence keeps the last id.
        has_sequence = await connection.exec_driver_sql(
            "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_sequence'"
        )
        if has_sequence.scalar():
            await connection.exec_driver_sql("DELETE FROM sqlite_sequence")


async def rows_of_both(
    engine: AsyncEngine,
    run: Callable[[bool], Awaitable[object]],
) -> tuple[Rows, Rows, tuple[object, object]]:
    """Run ``run(False)`` (the reference) then ``run(True)`` (the override) on the emptied
    database; return the rows each left, and what each returned."""
    await empty_tables(engine)
    reference_result = await run(False)
    reference = await stored_rows(engine)
    await empty_tables(engine)
    override_result = await run(True)
    override = await stored_rows(engine)
    return reference, override, (reference_result, override_result)


def submissions() -> list[list[NewTask]]:
    """Requests of every shape: one task, a bulk one, optional fields set and not."""
    shared = [new_task_id() for _ in range(12)]

    def task(index: int, **changes: Any) -> NewTask:
        values: dict[str, Any] = {
            "name": "greeting",
            "account": "default",
            "payload": {"name": f"n{index}"},
            "created_at": NOW + timedelta(microseconds=index),
            "task_id": shared[index],
        }
        values.update(changes)
        return NewTask(**values)

    return [
        [task(0)],
        [
            task(
                1,
                name="download",
                account="acme",
                payload={"url": "https://bücher.example/ä?q=1", "n": 1.5, "nested": {"ok": True}},
                priority=9,
                host="xn--bcher-kva.example",
                run_at=NOW + timedelta(minutes=5),
                labels=("connector:salesforce", "tenant:ACME.eu-1@x"),
            )
        ],
        # A bulk request: its tasks share one moment.
        [
            task(
                index,
                created_at=NOW,
                priority=index % 10,
                labels=("a:1", "b:2", "c:3", "d:4:5")[: index % 5],
            )
            for index in range(2, 10)
        ],
        [task(10, payload={"quote": "\"'\\", "empty": {}, "list": [1, None, "é ✓"]})],
        [task(11, created_at=NOW.astimezone(UTC) - timedelta(days=400))],
    ]


async def insert_all(intake: Intake, batches: Sequence[Sequence[Sequence[NewTask]]]) -> None:
    try:
        for batch in batches:
            prepared = [intake.prepare(tasks) for tasks in batch]
            await intake.insert(partial(list, prepared))
    finally:
        await intake.close()


async def test_intake_override_writes_the_reference_rows(
    settings: Settings, engine: AsyncEngine
) -> None:
    requests = submissions()
    # One transaction of one request, then one of all the others together.
    batches = [requests[:1], requests[1:]]

    async def run(override: bool) -> None:
        intake = open_intake(settings, engine) if override else CoreIntake(engine)
        if override:
            assert type(intake) is not CoreIntake, "each database has its fast path"
        await insert_all(intake, batches)

    reference, override, _ = await rows_of_both(engine, run)

    count = sum(len(tasks) for tasks in requests)
    assert [len(reference[table]) for table in ("tasks", "outbox", "task_events")] == [count] * 3
    assert len(reference["task_labels"]) == sum(len(t.labels) for r in requests for t in r) > 0
    assert override == reference


async def test_a_batch_with_a_failing_submission_writes_nothing_on_either(
    settings: Settings, engine: AsyncEngine
) -> None:
    requests = submissions()
    clash = NewTask(
        name="greeting",
        account="default",
        payload={},
        created_at=NOW,
        task_id=requests[0][0].task_id,
    )

    async def run(override: bool) -> str:
        intake = open_intake(settings, engine) if override else CoreIntake(engine)
        try:
            await intake.insert(lambda: [intake.prepare(requests[0])])
            try:
                await intake.insert(
                    lambda: [intake.prepare(tasks) for tasks in [*requests[1:], [clash]]]
                )
            except Exception as error:
                return type(error).__name__
            return "written"
        finally:
            await intake.close()

    reference, override, (reference_error, override_error) = await rows_of_both(engine, run)

    assert reference_error == override_error == "IntegrityError"
    assert [len(reference[table]) for table in TABLES] == [1, 0, 1, 1]
    assert override == reference


def _keyed(index: int, key: str, request: str, **changes: Any) -> NewTask:
    values: dict[str, Any] = {
        "name": "greeting",
        "account": "default",
        "payload": {"name": f"k{index}"},
        "created_at": NOW + timedelta(seconds=index),
        "idempotency_key": key,
        "request_hash": request,
    }
    values.update(changes)
    return NewTask(**values)


async def test_idempotency_keys_give_the_reference_rows_and_outcomes(
    settings: Settings, engine: AsyncEngine
) -> None:
    first = [
        [_keyed(0, "k1", "h1")],
        [_keyed(1, "k2", "h2"), _keyed(2, "k3", "h3"), *submissions()[0]],
    ]
    second = [
        [_keyed(3, "k1", "h1", labels=("x:replay",))],  # a replay of the first batch's task
        [_keyed(4, "k1", "other")],  # the same key, another request
        [_keyed(5, "k4", "h4", labels=("x:new",))],  # new...
        [_keyed(6, "k4", "h4", labels=("x:dup",))],  # ...and its duplicate in the same transaction
        [_keyed(7, "k4", "h5")],  # ...and a different request under it, same transaction
        [_keyed(8, "k1", "h1", account="acme")],  # another account's k1: a new task
        [_keyed(9, "k2", "h2"), _keyed(10, "k9", "h9")],  # a bulk: one replayed, one new
    ]
    ids = {
        f"{task.account}:{task.payload['name']}": task.task_id for r in first + second for task in r
    }

    async def run(override: bool) -> list[Any]:
        intake = open_intake(settings, engine) if override else CoreIntake(engine)
        try:
            outcomes = []
            for batch in (first, second):
                prepared = [intake.prepare(tasks) for tasks in batch]
                outcomes.append(await intake.insert(partial(list, prepared)))
            return outcomes
        finally:
            await intake.close()

    reference, override, (reference_outcomes, override_outcomes) = await rows_of_both(engine, run)

    assert override == reference
    assert override_outcomes == reference_outcomes
    k1, k2, k4 = ids["default:k0"], ids["default:k1"], ids["default:k5"]
    assert isinstance(reference_outcomes, list)
    assert isinstance(override_outcomes, list)
    assert _holders(reference_outcomes) == [
        [[None], [None, None, None]],
        [
            [(k1, True)],
            [(k1, False)],
            [None],
            [(k4, True)],
            [(k4, False)],
            [None],
            [(k2, True), None],
        ],
    ]
    # Each replay carries its task's view as the read store gives it (the API answers a
    # replay with it, without reading the task again).
    reads = open_reads(settings, engine)
    for batch in reference_outcomes + override_outcomes:
        for outcome in batch:
            for existing in outcome:
                if existing is not None:
                    assert existing.view == await reads.task(
                        task_id=existing.task_id, account="default"
                    )
    # One task per key, and outbox rows, events and labels only for the tasks written.
    assert [len(reference[table]) for table in TABLES] == [7, 1, 7, 7]
    assert [row[:2] for row in reference["task_labels"]] == [(k4, "x:new")]


def _holders(outcomes: list[Any]) -> list[Any]:
    """Each outcome's (task id, same request) per task, None where inserted."""
    return [
        [[None if e is None else (e.task_id, e.same_request) for e in outcome] for outcome in batch]
        for batch in outcomes
    ]


async def test_a_bulk_reusing_a_key_writes_nothing_of_its_batch_on_either(
    settings: Settings, engine: AsyncEngine
) -> None:
    first = [_keyed(0, "k1", "h1")]
    others = submissions()[0]
    bulk = [_keyed(1, "k2", "h2"), _keyed(2, "k1", "changed")]

    async def run(override: bool) -> str:
        intake = open_intake(settings, engine) if override else CoreIntake(engine)
        try:
            await intake.insert(lambda: [intake.prepare(first)])
            try:
                await intake.insert(lambda: [intake.prepare(others), intake.prepare(bulk)])
            except KeyReusedError as error:
                return f"reused {error.indexes}"
            return "written"
        finally:
            await intake.close()

    reference, override, (reference_error, override_error) = await rows_of_both(engine, run)

    assert reference_error == override_error == "reused [1]"
    assert [len(reference[table]) for table in TABLES] == [1, 0, 1, 1]
    assert override == reference
