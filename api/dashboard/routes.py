"""GET /dashboard (the page and its assets) and the two reads it makes beyond the REST API.

The page is a shell: it holds no data, so it is served to anyone, like /healthz. Every
read and action it makes goes to /api/v1 with ``Authorization: Bearer <key>`` (a key the
page asks for once when API_KEYS is set, kept in the tab's sessionStorage), checked as
any other API call. Its Content-Security-Policy lets it load and call nothing but this
origin.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from api.admin import CallerDep
from api.answers import checked_id
from api.dashboard.schemas import DashboardPublic, DashboardTaskPublic
from api.dashboard.summary import Dashboard
from api.deps import ReadsDep
from api.schemas import ErrorMessage, TaskEventPublic
from api.waiting import WaitingDep
from throttler.constants import API_PREFIX

PAGE_PATH = "/dashboard"
ASSETS_PATH = "/dashboard/assets"
SUMMARY_PATH = "/dashboard"
PACKAGE = "api.dashboard"
# Nothing from another origin: no script, style, image, font or connection.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing or invalid API key (API_KEYS set)."},
    503: {"model": ErrorMessage, "description": "The database cannot answer now; retry later."},
}


@cache
def _page() -> str:
    return (files(PACKAGE) / "static" / "index.html").read_text(encoding="utf-8")


async def get_dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


DashboardDep = Annotated[Dashboard, Depends(get_dashboard)]

page_router = APIRouter(include_in_schema=False)


@page_router.get(PAGE_PATH)
async def dashboard_page() -> HTMLResponse:
    return HTMLResponse(
        _page(),
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


router = APIRouter(prefix=API_PREFIX, tags=["dashboard"])


@router.get(
    SUMMARY_PATH,
    name="dashboard_summary",
    operation_id="dashboard_summary",
    response_model=DashboardPublic,
    responses=_RESPONSES,
    summary="What /dashboard shows, read at most once a second per API process.",
)
async def dashboard_summary(caller: CallerDep, dashboard: DashboardDep) -> DashboardPublic:
    return await dashboard.summary(caller)


@router.get(
    f"{SUMMARY_PATH}/tasks/{{task_id}}",
    name="dashboard_task",
    operation_id="dashboard_task",
    response_model=DashboardTaskPublic,
    responses=_RESPONSES | {404: {"model": ErrorMessage, "description": "No such task."}},
    summary="A task's view, why it waits and its timeline; an admin key finds any account's.",
)
async def dashboard_task(
    task_id: str,
    caller: CallerDep,
    dashboard: DashboardDep,
    reads: ReadsDep,
    waiting: WaitingDep,
) -> DashboardTaskPublic:
    not_found = checked_id(task_id)
    account: str | None = caller.account
    if caller.admin:
        account = await dashboard.reads.account_of(task_id)
    task = None if account is None else await reads.task(task_id=task_id, account=account)
    events = None if account is None else await reads.events(task_id=task_id, account=account)
    if task is None or events is None or account is None:
        raise not_found
    return DashboardTaskPublic(
        account=account,
        task=await waiting.view(task, account=account),
        events=[TaskEventPublic.from_event(event) for event in events],
    )


def mount_dashboard(app: FastAPI) -> None:
    """Serve the page, its assets and its reads (the lifespan sets ``app.state.dashboard``)."""
    app.include_router(page_router)
    app.include_router(router)
    app.mount(ASSETS_PATH, StaticFiles(packages=[(PACKAGE, "static")]), name="dashboard_assets")
