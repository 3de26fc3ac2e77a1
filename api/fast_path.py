"""Serve an endpoint's ordinary requests without FastAPI's per-request machinery.

For every request FastAPI solves the endpoint's dependency tree (settings, API key,
account, options, writer) and validates each query parameter; on the submit endpoints
that costs several times more CPU than validating and group-committing the task (see
the README's benchmark notes). A fast path serves the ordinary request (a JSON body, no
query string, a valid key) with the same functions as the endpoint, and declines (None)
anything else before it has written anything. FastAPI then serves the request as usual,
so every rejection (422, 401, ...) is FastAPI's own, and the OpenAPI schema comes from
the endpoint's signature as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.security.utils import get_authorization_scheme_param

from api.deps import account_of_key
from api.strict_json import StrictJSONRequest, StrictJSONRoute
from throttler.constants import DEFAULT_ACCOUNT
from throttler.settings import Settings

FastPath = Callable[[StrictJSONRequest], Awaitable[Response | None]]
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])

# Endpoint function -> its fast path; filled by @fast_path as the routes are declared.
_FAST_PATHS: dict[Callable[..., Any], FastPath] = {}


def fast_path(serve: FastPath) -> Callable[[Endpoint], Endpoint]:
    """Declare ``serve`` the fast path of the decorated endpoint (on a FastPathRoute)."""

    def register(endpoint: Endpoint) -> Endpoint:
        _FAST_PATHS[endpoint] = serve
        return endpoint

    return register


class FastPathRoute(StrictJSONRoute):
    """A route that tries its endpoint's fast path first, then FastAPI's own handling."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        standard = super().get_route_handler()
        serve = _FAST_PATHS.get(self.endpoint)
        if serve is None:
            return standard

        async def handler(request: Request) -> Response:
            # One request object for both: the body is read once and cached on it.
            strict = StrictJSONRequest(request.scope, request.receive)
            response = await serve(strict)
            if response is None:
                response = await standard(strict)
            return response

        return handler


def plain_request(request: Request) -> bool:
    """True for a request a fast path may serve: no query string, a JSON body.

    Anything else (options to validate, another content type, which FastAPI answers
    with a 422) goes to FastAPI. Exactly ``application/json``, whatever its parameters;
    rarer spellings FastAPI also accepts simply take the slower path.
    """
    if request.scope.get("query_string"):
        return False
    content_type = request.headers.get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def fast_account(request: Request, settings: Settings) -> str | None:
    """The caller's account as ``api.deps.get_account`` finds it; None where that raises."""
    accounts = settings.accounts_by_key
    if not accounts:
        return DEFAULT_ACCOUNT
    authorization = request.headers.get("authorization")
    scheme, credentials = get_authorization_scheme_param(authorization)
    # fastapi.security.HTTPBearer's reading of the header.
    if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
        return None
    return account_of_key(accounts, credentials)
