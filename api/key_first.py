"""Refuse a request body without a valid API key before reading it."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import account_of_authorization, unauthorized


class KeyBeforeBodyMiddleware:
    """Answer 401 to a request with a body under ``prefix`` when its key is not valid.

    The endpoints check the key (``api.deps.get_account``) only once the body has been
    read and parsed: up to megabytes of work for anyone, keyless. This answers the same
    401 from the headers alone. Requests without a body are left to the endpoints, which
    answer them as cheaply; so is everything when ``API_KEYS`` is empty.
    """

    def __init__(self, app: ASGIApp, *, accounts_by_key: Mapping[str, str], prefix: str) -> None:
        self.app = app
        self.accounts_by_key = accounts_by_key
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.accounts_by_key
            or not scope["path"].startswith(self.prefix)
        ):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        if has_body and (
            account_of_authorization(self.accounts_by_key, headers.get("authorization")) is None
        ):
            error = unauthorized()
            response = JSONResponse(
                {"detail": error.detail}, status_code=error.status_code, headers=error.headers
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
