"""Submit a task of each catalog kind; read a task back by id, list tasks, read a history."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api.admin import FORBIDDEN_RESPONSE, ReadAccountDep
from api.answers import TASK_RESPONSES, UNAUTHORIZED, UNAVAILABLE, checked_id
from api.batch_views import batch_json, view_fields
from api.bulk import BulkRoute, new_tasks
from api.deps import AccountDep, AnnouncerDep, IntakeDep, ReadsDep, RetriesDep, WaitersDep
from api.fast_path import FastPathRoute
from api.idempotency import (
    OPENAPI_PARAMETER,
    REPLAY_RESPONSE,
    REPLAYED_HEADER,
    header_key,
    header_reused,
    items_reused,
    original_views,
)
from api.schemas import (
    MAX_BULK_TASKS,
    ErrorMessage,
    RetryCountPublic,
    RetryFilterBody,
    TaskBatchCreate,
    TaskBatchPublic,
    TaskEventPublic,
    TaskEventsPublic,
    TaskListPublic,
    TaskPublic,
)
from api.submit_options import SubmitOptions, get_submit_options
from api.task_list import encode_cursor, get_task_query
from api.waiters import MAX_WAIT_S, long_poll
from api.waiting import WaitingDep
from throttler.catalog import CATALOG, TaskInput, TaskSpec
from throttler.constants import API_PREFIX
from throttler.logs import fields
from throttler.models import utcnow
from throttler.store.intake import KeyReusedError, reused_indexes
from throttler.store.reads import TaskQuery, TaskView
from throttler.store.retries import MAX_RETRIES_PER_CALL, RetryOutcome
from throttler.submit import request_digest

log = logging.getLogger(__name__)

RESULT_ROUTE = "task_result"
RESULT_PATH = "/task/result/{task_id}"

_SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **REPLAY_RESPONSE,
    202: {
        "description": "Accepted: the task, its outbox row and its event are committed.",
        "headers": {
            "Location": {"description": "URL of the task's result.", "schema": {"type": "string"}}
        },
    },
    **UNAUTHORIZED,
    413: {"model": ErrorMessage, "description": "Request body too large."},
    **UNAVAILABLE,
}
# Strict JSON bodies: NaN, duplicate keys, deep nesting and non-UTF-8 get a 422. The
# submit endpoints' plain requests call them without FastAPI's dependency solving
# (api.fast_path); everything else goes through FastAPI.
router = APIRouter(prefix=API_PREFIX, tags=["tasks"], route_class=FastPathRoute)


def _location(request: Request, task_id: str) -> str:
    # What request.url_for(RESULT_ROUTE, ...).path gives, without searching the routes.
    root_path: str = request.scope.get("root_path", "")
    return root_path + API_PREFIX + RESULT_PATH.format(task_id=task_id)


def _submit_endpoint(spec: TaskSpec) -> Callable[..., Awaitable[TaskPublic]]:
    """Build the POST handler for one task kind."""

    async def submit(
        body: TaskInput,
        request: Request,
        response: Response,
        account: AccountDep,
        intake: IntakeDep,
        options: Annotated[SubmitOptions, Depends(get_submit_options)],
    ) -> TaskPublic:
        key = header_key(request)
        task = options.new_task(name=spec.name, task_input=body, account=account, now=utcnow())
        if key is not None:
            digest = request_digest(
                name=spec.name,
                payload=task.payload,
                priority=options.priority,
                delay_s=options.delay_s,
                run_at=options.run_at,
                labels=options.labels,
            )
            task = replace(task, idempotency_key=key, request_hash=digest)
        # The writer returns once the task, outbox row and event are committed (a batch
        # shared with concurrent requests); a failed commit raises, so no 202 is sent.
        [existing] = await intake.submit([task])
        if existing is not None:
            # The key is bound to a task already: nothing was written.
            if not existing.same_request:
                raise header_reused()
            response.status_code = status.HTTP_200_OK
            response.headers[REPLAYED_HEADER] = "true"
            response.headers["Location"] = _location(request, existing.task_id)
            return TaskPublic.from_task(existing.view)
        log.info(
            "task.submitted",
            extra=fields(
                task_id=task.task_id,
                name=spec.name,
                account=account,
                priority=task.priority,
                run_at=task.run_at.isoformat() if task.run_at else None,
            ),
        )
        response.headers["Location"] = _location(request, task.task_id)
        return TaskPublic.pending(task)

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


_WITH_KEY_HEADER: dict[str, Any] = {"parameters": [OPENAPI_PARAMETER]}

for _spec in CATALOG.values():
    router.add_api_route(
        f"/task/{_spec.name}",
        _submit_endpoint(_spec),
        methods=["POST"],
        openapi_extra=_WITH_KEY_HEADER,
        status_code=status.HTTP_202_ACCEPTED,
        response_model=TaskPublic,
        responses=_SUBMIT_RESPONSES,
        name=f"submit_{_spec.name}",
        operation_id=f"submit_{_spec.name}",
        summary=_spec.summary,
    )


async def submit_tasks(
    batch: TaskBatchCreate,
    request: Request,
    account: AccountDep,
    intake: IntakeDep,
) -> Response:
    if request.query_params:
        # Options belong to each item; a query option would look applied and not be.
        name = next(iter(request.query_params))
        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": "Extra inputs are not permitted; give options per task",
                    "input": request.query_params[name],
                }
            ]
        )
    # Every item is validated before anything is written; then one transaction.
    tasks = new_tasks(batch.tasks, account=account, now=utcnow())
    try:
        outcome = await intake.submit(tasks)
    except KeyReusedError as error:  # nothing of the request was written
        raise items_reused(error.indexes) from error
    reused = reused_indexes(outcome)
    if reused:  # every item's key was bound already: nothing was written
        raise items_reused(reused)
    replayed = [existing.task_id for existing in outcome if existing is not None]
    originals = original_views(outcome)
    log.info(
        "tasks.submitted",
        extra=fields(
            count=len(tasks) - len(replayed),
            replayed=len(replayed),
            account=account,
            first_task_id=tasks[0].task_id,
        ),
    )
    # TaskBatchPublic's body, without a model per task (api.batch_views).
    body = batch_json(
        [
            TaskPublic.pending_fields(task)
            if existing is None
            else view_fields(originals[existing.task_id])
            for task, existing in zip(tasks, outcome, strict=True)
        ]
    )
    if len(replayed) == len(tasks):
        # Every item a replay: the request as a whole created nothing.
        return Response(
            body,
            status_code=status.HTTP_200_OK,
            media_type="application/json",
            headers={REPLAYED_HEADER: "true"},
        )
    return Response(body, status_code=status.HTTP_202_ACCEPTED, media_type="application/json")


# Its own route class: a body of more than MAX_BULK_TASKS tasks is refused while parsed.
router.add_api_route(
    "/tasks",
    submit_tasks,
    methods=["POST"],
    route_class_override=BulkRoute,
    name="submit_tasks",
    operation_id="submit_tasks",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskBatchPublic,
    responses={
        200: {
            "description": "Every item's idempotency_key was bound to the same request "
            "already: the original tasks, nothing created.",
            "headers": REPLAY_RESPONSE[200]["headers"],
        },
        202: {
            "description": "Accepted: every new task, outbox row and event is committed; "
            "an item whose idempotency_key was bound to the same request already shows "
            "its original task."
        },
        **UNAUTHORIZED,
        413: {
            "model": ErrorMessage,
            "description": f"Request body too large, or more than {MAX_BULK_TASKS} tasks.",
        },
        **UNAVAILABLE,
    },
    summary=f"Submit up to {MAX_BULK_TASKS} tasks of any kinds at once: all or none.",
)


@router.get(
    "/tasks",
    name="list_tasks",
    operation_id="list_tasks",
    response_model=TaskListPublic,
    responses=UNAUTHORIZED | FORBIDDEN_RESPONSE | UNAVAILABLE,
    summary="List the caller's tasks newest first, filtered, a page at a time.",
)
async def list_tasks(
    query: Annotated[TaskQuery, Depends(get_task_query)], reads: ReadsDep, waiting: WaitingDep
) -> TaskListPublic:
    page = await reads.tasks(query)
    return TaskListPublic(
        tasks=await waiting.views(page.tasks, account=query.account),
        next_cursor=None if page.next is None else encode_cursor(page.next),
    )


@router.get(
    "/tasks/{task_id}",
    name="get_task",
    operation_id="get_task",
    response_model=TaskPublic,
    responses=TASK_RESPONSES | FORBIDDEN_RESPONSE,
    summary="Read a task: the same view as the result endpoint, without waiting.",
)
async def get_task(
    task_id: str, account: ReadAccountDep, reads: ReadsDep, waiting: WaitingDep
) -> TaskPublic:
    not_found = checked_id(task_id)
    task = await reads.task(task_id=task_id, account=account)
    if task is None:
        raise not_found
    return await waiting.view(task, account=account)


@router.get(
    "/tasks/{task_id}/events",
    name="task_events",
    operation_id="task_events",
    response_model=TaskEventsPublic,
    responses=TASK_RESPONSES | FORBIDDEN_RESPONSE,
    summary="Read a task's history: one event per transition, oldest first.",
)
async def task_events(task_id: str, account: ReadAccountDep, reads: ReadsDep) -> TaskEventsPublic:
    not_found = checked_id(task_id)
    events = await reads.events(task_id=task_id, account=account)
    if events is None:
        raise not_found
    return TaskEventsPublic(events=[TaskEventPublic.from_event(event) for event in events])


@router.get(
    RESULT_PATH,
    name=RESULT_ROUTE,
    operation_id=RESULT_ROUTE,
    response_model=TaskPublic,
    responses=TASK_RESPONSES | FORBIDDEN_RESPONSE,
    summary="Read a task's status and result, optionally waiting for it to finish.",
)
async def task_result(
    task_id: str,
    request: Request,
    account: ReadAccountDep,
    reads: ReadsDep,
    waiters: WaitersDep,
    waiting: WaitingDep,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_S,
            description=(
                f"Long-poll: seconds (0-{MAX_WAIT_S:g}) to wait for the task to reach a "
                "terminal status. The answer comes as soon as it does, else after `wait` "
                "seconds with the task as it then stands. 0 (default) answers at once."
            ),
        ),
    ] = 0,
) -> TaskPublic:
    not_found = checked_id(task_id)

    async def read() -> TaskView | None:
        return await reads.task(task_id=task_id, account=account)

    task = await long_poll(read, task_id=task_id, wait_s=wait, waiters=waiters, request=request)
    if task is None:
        raise not_found
    return await waiting.view(task, account=account)


@router.post(
    "/tasks/retry",
    name="retry_tasks",
    operation_id="retry_tasks",
    response_model=RetryCountPublic,
    responses=UNAUTHORIZED | UNAVAILABLE,
    summary=(
        f"Retry the caller's failed and cancelled tasks a filter matches, at most "
        f"{MAX_RETRIES_PER_CALL} a call, oldest first."
    ),
)
async def retry_tasks(
    body: RetryFilterBody, account: AccountDep, retries: RetriesDep, announcer: AnnouncerDep
) -> RetryCountPublic:
    done = await retries.retry_matching(body.selection(account), now=utcnow())
    if done.count:
        # Back in the outbox: wake an idle relay rather than leave them to its next poll.
        announcer.committed()
    log.info(
        "tasks.retried",
        extra=fields(account=account, count=done.count, remaining=done.remaining),
    )
    return RetryCountPublic(count=done.count, remaining=done.remaining)


@router.post(
    "/tasks/{task_id}/retry",
    name="retry_task",
    operation_id="retry_task",
    response_model=TaskPublic,
    responses={
        **TASK_RESPONSES,
        409: {
            "model": TaskPublic,
            "description": "Neither failed nor cancelled: the task as it is.",
        },
    },
    summary="Take a failed or cancelled task back to pending: it runs again under the limits.",
)
async def retry_task(
    task_id: str, account: AccountDep, retries: RetriesDep, announcer: AnnouncerDep
) -> TaskPublic | JSONResponse:
    not_found = checked_id(task_id)
    answer = await retries.retry(task_id=task_id, account=account, now=utcnow())
    if answer.view is None:
        raise not_found
    view = TaskPublic.from_task(answer.view)
    if answer.outcome is RetryOutcome.WRONG_STATUS:
        return JSONResponse(status_code=status.HTTP_409_CONFLICT, content=jsonable_encoder(view))
    announcer.committed()
    log.info("task.retried", extra=fields(task_id=task_id, account=account))
    return view
