"""Cancel one task, or the caller's tasks a filter matches (SPEC, Cancel; Guarantee 5).

The cancel commits first (throttler.store.cancels: the task is final, its in-flight slot
free, and no worker will start it or record its outcome); then the running attempts it
cancelled are interrupted through ARQ's abort (throttler.aborts) and the cancelled ids
are announced as finished (long-polls answer, relays under in-flight caps wake). Both
are best effort: with Redis away the cancel still stands and answers 200, saying so in
the ``Cancel-Interrupt`` header; the attempt then runs on and its outcome is discarded.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from api.answers import TASK_RESPONSES, UNAUTHORIZED, UNAVAILABLE, checked_id
from api.deps import AccountDep, CancelsDep, RedisDep
from api.schemas import CancelCountPublic, CancelFilterBody, TaskConflictPublic, TaskPublic
from api.strict_json import StrictJSONRoute
from api.strict_query import QuerySpelling, query_error
from throttler.aborts import request_aborts
from throttler.constants import API_PREFIX
from throttler.finished import publish_finished
from throttler.logs import fields
from throttler.models import utcnow
from throttler.store.cancels import MAX_CANCELS_PER_CALL, CancelOutcome

log = logging.getLogger(__name__)

# Set when the cancel ended running attempts: whether their workers were told to stop
# them. "not-sent": Redis could not be told; the cancel stands all the same.
INTERRUPT_HEADER = "Cancel-Interrupt"
_FORCE_SPELLING = QuerySpelling(names=frozenset({"force"}))
_BOOLEANS = {"true": True, "false": False}
_INTERRUPT_HEADER_DOC: dict[str, Any] = {
    INTERRUPT_HEADER: {
        "description": "Only when running tasks were cancelled: `requested` (their workers "
        "were told to interrupt them) or `not-sent` (Redis could not be told: each runs "
        "on, its outcome discarded).",
        "schema": {"type": "string", "enum": ["requested", "not-sent"]},
    }
}

router = APIRouter(prefix=API_PREFIX, tags=["tasks"], route_class=StrictJSONRoute)


async def get_force(
    request: Request,
    force: Annotated[
        bool,
        Query(
            description="Interrupt running side-effecting tasks too (`true` or `false`; "
            "default false: they are left running, their outcome recorded)."
        ),
    ] = False,
) -> bool:
    """``?force``: exactly ``true`` or ``false``, given at most once, and nothing else."""
    _FORCE_SPELLING.check(request)
    raw = request.query_params.get("force")
    if raw is not None and raw not in _BOOLEANS:
        # FastAPI would also take 1, yes, on, ...: a typo must not force anything.
        raise query_error("force", "bool_parsing", "Input should be true or false", raw)
    return force


ForceDep = Annotated[bool, Depends(get_force)]


async def _after_commit(
    redis: RedisDep, response: Response, *, task_ids: list[str], interrupt: list[str]
) -> None:
    """Interrupt the running attempts cancelled, then announce the cancelled tasks."""
    if interrupt:
        sent = await request_aborts(redis, interrupt)
        response.headers[INTERRUPT_HEADER] = "requested" if sent else "not-sent"
        if not sent:
            # Redis is away: do not wait for it twice. Long-polls find the tasks final
            # within their next database sweep (a second).
            return
    await publish_finished(redis, task_ids=task_ids)


@router.post(
    "/tasks/cancel",
    name="cancel_tasks",
    operation_id="cancel_tasks",
    response_model=CancelCountPublic,
    responses={200: {"headers": _INTERRUPT_HEADER_DOC}, **UNAUTHORIZED, **UNAVAILABLE},
    summary=(
        f"Cancel the caller's pending, queued and running tasks a filter matches, at most "
        f"{MAX_CANCELS_PER_CALL} a call, oldest first."
    ),
)
async def cancel_tasks(
    body: CancelFilterBody,
    response: Response,
    account: AccountDep,
    cancels: CancelsDep,
    redis: RedisDep,
    force: ForceDep,
) -> CancelCountPublic:
    done = await cancels.cancel_matching(body.selection(account), now=utcnow(), force=force)
    await _after_commit(redis, response, task_ids=done.task_ids, interrupt=done.interrupt)
    log.info(
        "tasks.cancelled",
        extra=fields(
            account=account,
            count=done.count,
            remaining=done.remaining,
            skipped=done.skipped,
            interrupted=len(done.interrupt),
            force=force,
        ),
    )
    return CancelCountPublic(count=done.count, remaining=done.remaining, skipped=done.skipped)


@router.post(
    "/tasks/{task_id}/cancel",
    name="cancel_task",
    operation_id="cancel_task",
    response_model=TaskPublic,
    responses={
        200: {"headers": _INTERRUPT_HEADER_DOC},
        **TASK_RESPONSES,
        409: {
            "model": TaskConflictPublic,
            "description": "Already succeeded, failed or cancelled; or running and "
            "side-effecting without `?force=true`: the task as it is, and why.",
        },
    },
    summary="Cancel a pending, queued or running task: it never starts, or is interrupted.",
)
async def cancel_task(
    task_id: str,
    response: Response,
    account: AccountDep,
    cancels: CancelsDep,
    redis: RedisDep,
    force: ForceDep,
) -> TaskPublic | JSONResponse:
    not_found = checked_id(task_id)
    answer = await cancels.cancel(task_id=task_id, account=account, now=utcnow(), force=force)
    if answer.view is None:
        raise not_found
    view = TaskPublic.from_task(answer.view)
    if answer.outcome is not CancelOutcome.CANCELLED:
        return _conflict(view, answer.outcome)
    interrupt = [] if answer.interrupt is None else [answer.interrupt]
    await _after_commit(redis, response, task_ids=[task_id], interrupt=interrupt)
    log.info(
        "task.cancelled",
        extra=fields(task_id=task_id, account=account, force=force, interrupted=bool(interrupt)),
    )
    return view


def _conflict(view: TaskPublic, outcome: CancelOutcome) -> JSONResponse:
    if outcome is CancelOutcome.SIDE_EFFECTING:
        detail = (
            "the task is running and side-effecting: it is left running and its outcome "
            "recorded; cancel with ?force=true to interrupt it"
        )
    else:
        detail = f"the task is already {view.status.value}"
    conflict = TaskConflictPublic(**view.model_dump(), detail=detail)
    return JSONResponse(status_code=status.HTTP_409_CONFLICT, content=jsonable_encoder(conflict))
