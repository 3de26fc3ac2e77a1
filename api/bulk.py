"""Validate a bulk submission item by item, so that a 422 names the item and its field."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from api.fast_path import FastPathRoute
from api.schemas import MAX_BULK_TASKS, TaskItemCreate
from api.strict_json import ArrayCap, StrictJSONRequest
from api.submit_options import MAX_DELAY_S, SubmitOptions
from throttler.catalog import CATALOG
from throttler.constants import API_PREFIX
from throttler.labels import labels_of
from throttler.submit import NewTask, request_digest

BULK_PATH = f"{API_PREFIX}/tasks"
# Bodies of POST /api/v1/tasks may be this large (or API_MAX_BODY_BYTES, if larger):
# 1,000 downloads with URLs of the longest accepted length fit.
BULK_MAX_BODY_BYTES = 4 * 1024 * 1024

_KNOWN_NAMES = ", ".join(sorted(CATALOG))


class BulkJSONRequest(StrictJSONRequest):
    """A bulk body: its ``tasks`` past MAX_BULK_TASKS are a 413 before they are parsed."""

    array_cap = ArrayCap(key="tasks", max_items=MAX_BULK_TASKS)


class BulkRoute(FastPathRoute):
    request_class = BulkJSONRequest


def _item_error(index: int, field: str, kind: str, message: str, value: Any) -> dict[str, Any]:
    return {"type": kind, "loc": ("body", "tasks", index, field), "msg": message, "input": value}


def _validate_item(
    index: int, item: TaskItemCreate, *, account: str, now: datetime
) -> tuple[NewTask | None, list[dict[str, Any]]]:
    """Return the item as a task to insert, or the errors that name its fields."""
    spec = CATALOG.get(item.name)
    if spec is None:
        message = f"unknown task name {item.name[:100]!r}; known: {_KNOWN_NAMES}"
        return None, [_item_error(index, "name", "value_error", message, item.name)]
    try:
        task_input = spec.input_model.model_validate(item.input)
    except ValidationError as error:
        return None, [
            {**detail, "loc": ("body", "tasks", index, "input", *detail["loc"])}
            for detail in error.errors(include_url=False)
        ]
    if item.delay_s is not None and item.run_at is not None:
        message = "give either delay_s or run_at, not both"
        return None, [_item_error(index, "run_at", "value_error", message, str(item.run_at))]
    if item.run_at is not None and item.run_at > now + timedelta(seconds=MAX_DELAY_S):
        message = f"run_at may be at most {MAX_DELAY_S} seconds ahead"
        return None, [_item_error(index, "run_at", "less_than_equal", message, str(item.run_at))]
    options = SubmitOptions(
        priority=item.priority,
        delay_s=item.delay_s,
        run_at=item.run_at,
        # Checked already (TaskItemCreate): here only sorted.
        labels=labels_of(item.keys or []),
    )
    task = options.new_task(name=spec.name, task_input=task_input, account=account, now=now)
    if item.idempotency_key is not None:
        digest = request_digest(
            name=spec.name,
            payload=task.payload,
            priority=item.priority,
            delay_s=item.delay_s,
            run_at=item.run_at,
            labels=options.labels,
        )
        task = replace(task, idempotency_key=item.idempotency_key, request_hash=digest)
    return task, []


def new_tasks(items: Sequence[TaskItemCreate], *, account: str, now: datetime) -> list[NewTask]:
    """Return every item as a task to insert, or raise one 422 listing every invalid item."""
    tasks: list[NewTask] = []
    errors: list[dict[str, Any]] = []
    keys: set[str] = set()
    for index, item in enumerate(items):
        task, item_errors = _validate_item(index, item, account=account, now=now)
        errors.extend(item_errors)
        if item.idempotency_key is not None:
            if item.idempotency_key in keys:
                message = "idempotency_key given to an earlier item of this request"
                errors.append(
                    _item_error(
                        index, "idempotency_key", "value_error", message, item.idempotency_key
                    )
                )
            keys.add(item.idempotency_key)
        if task is not None:
            tasks.append(task)
    if errors:
        raise RequestValidationError(errors)
    return tasks
