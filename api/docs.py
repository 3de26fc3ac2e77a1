"""The API's documentation: /openapi.json, /docs and /redoc, and who may read them.

Every file the pages load (Swagger UI, ReDoc, the favicon) is served by the API itself from
the pinned fastapi-standalone-docs package, so the pages work with no internet; Google
fonts are left out. API_DOCS (throttler.settings) makes them public, protected or off.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, status
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import account_of_key
from throttler.settings import Settings

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = f"{DOCS_URL}/oauth2-redirect"
ASSETS_PACKAGE = "fastapi_standalone_docs"
# Where each of the package's folders is served. The ReDoc bundle, as the package ships it,
# loads its logo from "<page path>/logo-mini.svg": its folder must sit under /redoc.
SWAGGER_ASSETS_URL = DOCS_URL
REDOC_ASSETS_URL = REDOC_URL
FAVICON_ASSETS_URL = f"{DOCS_URL}/fastapi"
# The prompt browsers show for a protected page names this realm.
DOCS_REALM = "API docs"
DOCS_CHALLENGE = f'Basic realm="{DOCS_REALM}", charset="UTF-8"'

# A browser cannot add a bearer header to the requests Swagger UI and ReDoc make, but it
# answers a Basic challenge with a login prompt and then sends the pair with each request
# of the origin. So a protected page takes the key as the Basic password (any user name),
# or as a bearer token from other clients. Neither puts the key in a URL or an access log.
_basic = HTTPBasic(auto_error=False, realm=DOCS_REALM)
_bearer = HTTPBearer(auto_error=False)


async def _presented_key(request: Request) -> str | None:
    basic = await _basic(request)  # a malformed Basic header is a 401 already
    if basic is not None:
        return basic.password
    bearer = await _bearer(request)
    return bearer.credentials if bearer is not None else None


class DocsKeyCheck:
    """Let a request through only with a key of API_KEYS, as Basic password or bearer token."""

    def __init__(self, accounts_by_key: Mapping[str, str]) -> None:
        self._accounts_by_key = accounts_by_key

    async def __call__(self, request: Request) -> None:
        key = await _presented_key(request)
        if key is None or account_of_key(self._accounts_by_key, key) is None:
            raise HTTPException(
                status_code=status.HTTP_401_UNAUTHORIZED,
                detail="the API docs need a key of API_KEYS",
                headers={"WWW-Authenticate": DOCS_CHALLENGE},
            )


class _CheckedAssets:
    """Serve a folder of assets after the key check (a mount takes no dependencies)."""

    def __init__(self, app: ASGIApp, check: DocsKeyCheck) -> None:
        self._app = app
        self._check = check

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The HTTPException of a refused key reaches the app's handlers like a route's.
        await self._check(Request(scope, receive))
        await self._app(scope, receive, send)


def _root_path(request: Request) -> str:
    # Behind a proxy that strips a prefix, the page's links need it back (as FastAPI does).
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def mount_docs(app: FastAPI, settings: Settings) -> None:
    """Serve the schema, /docs and /redoc with their assets as ``settings.docs_access`` says.

    ``app`` must be built with ``openapi_url``, ``docs_url`` and ``redoc_url`` set to None,
    so that FastAPI's own, unprotected and CDN-loading routes are not there as well.
    """
    if app.openapi_url or app.docs_url or app.redoc_url:
        raise ValueError("build the app with openapi_url, docs_url and redoc_url set to None")
    access = settings.docs_access
    if access == "off":
        return
    check = DocsKeyCheck(settings.accounts_by_key) if access == "protected" else None
    router = APIRouter(include_in_schema=False, dependencies=[Depends(check)] if check else [])

    @router.get(OPENAPI_URL)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get(DOCS_URL)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root_path(request)
        return get_swagger_ui_html(
            openapi_url=root + OPENAPI_URL,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{SWAGGER_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{SWAGGER_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{FAVICON_ASSETS_URL}/favicon.png",
            oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @router.get(OAUTH2_REDIRECT_URL)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get(REDOC_URL)
    async def redoc(request: Request) -> HTMLResponse:
        root = _root_path(request)
        return get_redoc_html(
            openapi_url=root + OPENAPI_URL,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{REDOC_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{FAVICON_ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )

    app.include_router(router)
    # After the routes, so /docs/oauth2-redirect is a route; the favicon's folder before
    # the Swagger UI folder it lies under.
    for url, folder in (
        (FAVICON_ASSETS_URL, "static/fastapi"),
        (SWAGGER_ASSETS_URL, "static/swagger"),
        (REDOC_ASSETS_URL, "static/redoc"),
    ):
        files: ASGIApp = StaticFiles(packages=[(ASSETS_PACKAGE, folder)])
        app.mount(url, _CheckedAssets(files, check) if check else files)
