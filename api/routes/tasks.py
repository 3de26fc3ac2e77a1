"""Submit a task of each catalog kind, and read any task back by id."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from sqlalchemy import select

from api.deps import AccountDep, ReadSessionsDep, SessionsDep
from api.schemas import ErrorMessage, TaskPublic
from api.strict_json import StrictJSONRoute
from api.submit_options import SubmitOptions, get_submit_options
from throttler.catalog import CATALOG, TaskInput, TaskSpec
from throttler.constants import API_PREFIX
from throttler.logs import fields
from throttler.models import TASK_ID_LENGTH, Task, utcnow
from throttler.outbox import submit_task

log = logging.getLogger(__name__)

RESULT_ROUTE = "task_result"

_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing or invalid API key (API_KEYS set)."}
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorMessage,
        "description": "The database cannot take the request now; retry later.",
        "headers": {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
        },
    }
}
_SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "Accepted: the task, its outbox row and its event are committed.",
        "headers": {
            "Location": {"description": "URL of the task's result.", "schema": {"type": "string"}}
        },
    },
    **_UNAUTHORIZED,
    413: {"model": ErrorMessage, "description": "Request body too large."},
    **_UNAVAILABLE,
}
_RESULT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_UNAUTHORIZED,
    404: {"model": ErrorMessage, "description": "No such task for this account."},
    **_UNAVAILABLE,
}

# Strict JSON bodies: NaN, duplicate keys, deep nesting and non-UTF-8 get a 422.
router = APIRouter(prefix=API_PREFIX, tags=["tasks"], route_class=StrictJSONRoute)


def _submit_endpoint(spec: TaskSpec) -> Callable[..., Awaitable[TaskPublic]]:
    """Build the POST handler for one task kind."""

    async def submit(
        body: TaskInput,
        request: Request,
        response: Response,
        account: AccountDep,
        sessions: SessionsDep,
        options: Annotated[SubmitOptions, Depends(get_submit_options)],
    ) -> TaskPublic:
        now = utcnow()
        # One transaction: a 202 means the task, outbox row and event are all committed.
        async with sessions.begin() as session:
            task = await submit_task(
                session,
                name=spec.name,
                account=account,
                payload=body.model_dump(mode="json"),
                now=now,
                priority=options.priority,
                host=body.limit_host(),
                run_at=options.due_at(now),
            )
        response.headers["Location"] = request.url_for(RESULT_ROUTE, task_id=task.id).path
        log.info(
            "task.submitted",
            extra=fields(
                task_id=task.id,
                name=spec.name,
                account=account,
                priority=task.priority,
                run_at=task.run_at.isoformat() if task.run_at else None,
            ),
        )
        return TaskPublic.from_task(task)

    # FastAPI takes the body schema from the signature, so give this endpoint the spec's
    # own input model: it validates with it and shows it in /docs.
    signature = inspect.signature(submit, eval_str=True)
    parameters = [
        param.replace(annotation=spec.input_model) if param.name == "body" else param
        for param in signature.parameters.values()
    ]
    submit.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    submit.__name__ = submit.__qualname__ = f"submit_{spec.name}"
    return submit


for _spec in CATALOG.values():
    router.add_api_route(
        f"/task/{_spec.name}",
        _submit_endpoint(_spec),
        methods=["POST"],
        status_code=status.HTTP_202_ACCEPTED,
        response_model=TaskPublic,
        responses=_SUBMIT_RESPONSES,
        name=f"submit_{_spec.name}",
        operation_id=f"submit_{_spec.name}",
        summary=_spec.summary,
    )


@router.get(
    "/task/result/{task_id}",
    name=RESULT_ROUTE,
    operation_id=RESULT_ROUTE,
    response_model=TaskPublic,
    responses=_RESULT_RESPONSES,
    summary="Read a task's status and result.",
)
async def task_result(task_id: str, account: AccountDep, sessions: ReadSessionsDep) -> TaskPublic:
    # Another account's task answers exactly like a missing one: no existence leak.
    not_found = HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail="task not found")
    # Ids are printable ASCII; anything else (NUL, which PostgreSQL rejects outright) is
    # unknown without asking the database.
    if len(task_id) > TASK_ID_LENGTH or not (task_id.isascii() and task_id.isprintable()):
        raise not_found
    async with sessions() as session:
        task = await session.scalar(select(Task).where(Task.id == task_id, Task.account == account))
    if task is None:
        raise not_found
    return TaskPublic.from_task(task)
