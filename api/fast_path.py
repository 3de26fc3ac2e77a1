"""Serve an endpoint's plain requests without FastAPI's per-request dependency solving.

For every request FastAPI solves the endpoint's dependency tree (settings, API key,
account, options, writer) and validates each query parameter; on the submit endpoints
that costs several times more CPU than validating and group-committing the task (see
the README's benchmark notes). ``FastPathRoute`` serves a plain request (a JSON body, a
valid key, no query string but labels) by calling the endpoint function itself: the body is
validated by the endpoint's own body model, each dependency is read straight from the
app's state (``CHEAP_DEPENDENCIES``: what FastAPI would resolve it to for such a
request), and the return value is serialized by FastAPI's own ``serialize_response``.
Anything else (a query string, another content type, a missing key, an invalid body,
dependency overrides) is declined before the endpoint runs, and FastAPI then serves the
request as usual: every rejection (422, 401, ...) is FastAPI's own, and the OpenAPI
schema comes from the endpoint's signature. There is one definition of each endpoint.

An endpoint gets a fast path only if everything in its signature is covered: one body
model, the request, the response, and dependencies listed in ``CHEAP_DEPENDENCIES``;
any other parameter (a path or query parameter, another dependency) leaves the route
on FastAPI's handling alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Final

from fastapi import Request, Response
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import _effective_route_context_var, serialize_response
from fastapi.utils import is_body_allowed_for_status_code
from pydantic import BaseModel
from starlette.datastructures import State

from api.deps import account_of_authorization, get_account, get_intake, get_settings
from api.strict_json import StrictJSONRequest, StrictJSONRoute
from api.submit_options import SubmitOptions, get_submit_options
from throttler.constants import DEFAULT_ACCOUNT
from throttler.labels import LabelError, labels_of
from throttler.settings import Settings

# What a resolver returns when FastAPI would not resolve its dependency for this request
# (it would answer with an error instead): the request goes to FastAPI.
DECLINE: Final = object()

# (the request, its app's state) -> the dependency's value, or DECLINE
Resolver = Callable[[Request, State], Any]


def json_request(request: Request) -> bool:
    """True for a request whose body a fast path may read: a JSON body.

    Another content type (which FastAPI answers with a 422) goes to FastAPI. Exactly
    ``application/json``, whatever its parameters; rarer spellings FastAPI also accepts
    simply take the slower path. A query string is for the options' resolver to take
    (``_options``) or, on an endpoint without options, to decline.
    """
    content_type = request.headers.get("content-type", "")
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def fast_account(request: Request, settings: Settings) -> str | None:
    """The caller's account as ``api.deps.get_account`` finds it; None where that raises."""
    accounts = settings.accounts_by_key
    if not accounts:
        return DEFAULT_ACCOUNT
    return account_of_authorization(accounts, request.headers.get("authorization"))


def _settings(request: Request, state: State) -> Any:
    return state.settings


def _account(request: Request, state: State) -> Any:
    account = fast_account(request, state.settings)
    return DECLINE if account is None else account


def _intake(request: Request, state: State) -> Any:
    return state.intake


def _options(request: Request, state: State) -> Any:
    """What get_submit_options gives for no query string (the defaults) or for labels alone
    (``?key=a:b&key=c:d``, each a label, at most four, each once); DECLINE for anything
    else: other options, or anything get_submit_options would refuse, whose 422 is its own.
    """
    if not request.scope.get("query_string"):
        return SubmitOptions()
    items = request.query_params.multi_items()
    if not items or any(name != "key" for name, _ in items):
        return DECLINE
    try:
        labels = labels_of([value for _, value in items])
    except LabelError:
        return DECLINE
    return SubmitOptions(labels=labels)


# Each dependency the fast path resolves itself, with what FastAPI resolves it to for a
# plain request (tests/integration/test_api_fast_path.py compares the two answers).
CHEAP_DEPENDENCIES: Mapping[Callable[..., Any], Resolver] = {
    get_settings: _settings,
    get_account: _account,
    get_intake: _intake,
    get_submit_options: _options,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class FastPlan:
    """How to call one endpoint for a plain request, read once from its FastAPI route."""

    endpoint: Callable[..., Awaitable[Any]]
    body_name: str
    body_model: type[BaseModel]
    request_name: str | None
    response_name: str | None
    # (parameter name or None for a route-level dependency, its resolver)
    dependencies: tuple[tuple[str | None, Resolver], ...]
    route: Any  # the APIRoute (or FastAPI's per-inclusion view of it) it was read from
    # The response model, when plain model_dump_json serializes it as FastAPI would (no
    # include / exclude options); None otherwise.
    plain_model: type[BaseModel] | None
    # Whether a query string may be served: only by the options' resolver (``_options``).
    takes_query: bool

    async def serve(self, request: StrictJSONRequest) -> Response | None:
        """Answer ``request`` by the endpoint, or None (nothing done) to leave it to FastAPI."""
        route = self.route
        provider = route.dependency_overrides_provider
        if getattr(provider, "dependency_overrides", None) or not json_request(request):
            return None
        if not self.takes_query and request.scope.get("query_string"):
            return None
        values: dict[str, Any] = {}
        state = request.app.state
        for name, resolve in self.dependencies:
            value = resolve(request, state)
            if value is DECLINE:
                return None
            if name is not None:
                values[name] = value
        try:
            values[self.body_name] = self.body_model.model_validate(await request.json())
        except ValueError:  # invalid JSON or body: FastAPI gives the 422
            return None
        if self.request_name is not None:
            values[self.request_name] = request
        temporal = _TemporalResponse()
        if self.response_name is not None:
            values[self.response_name] = temporal
        raw = await self.endpoint(**values)
        if isinstance(raw, Response):
            return raw
        if type(raw) is self.plain_model:
            # What serialize_response gives for an instance of the response model itself
            # (not revalidated, dumped by the same pydantic-core serializer), for less.
            content: Any = raw.model_dump_json(by_alias=route.response_model_by_alias)
        else:
            # As fastapi.routing.get_request_handler serializes it, with its JSON fast path.
            content = await serialize_response(
                field=route.response_field,
                response_content=raw,
                include=route.response_model_include,
                exclude=route.response_model_exclude,
                by_alias=route.response_model_by_alias,
                exclude_unset=route.response_model_exclude_unset,
                exclude_defaults=route.response_model_exclude_defaults,
                exclude_none=route.response_model_exclude_none,
                dump_json=True,
            )
        status_code = temporal.status_code or route.status_code
        response = Response(content=content, media_type="application/json", status_code=status_code)
        response.raw_headers.extend(temporal.raw_headers)
        return response


class _TemporalResponse(Response):
    """FastAPI's temporal response: no headers yet, no status (the route's applies).

    What ``fastapi.dependencies.utils.solve_dependencies`` hands an endpoint's
    ``Response`` parameter (``Response()`` without its content-length, status None),
    without computing the headers it would delete.
    """

    def __init__(self) -> None:
        self.raw_headers = []
        self.status_code = None  # type: ignore[assignment]
        self.background = None
        self.body = b""


def fast_plan(route: Any) -> FastPlan | None:
    """The fast path of ``route``, or None when its signature asks for more than it covers."""
    dependant = route.dependant
    if (
        dependant.path_params
        or dependant.query_params
        or dependant.header_params
        or dependant.cookie_params
        or dependant.websocket_param_name
        or dependant.http_connection_param_name
        or dependant.background_tasks_param_name
        or dependant.security_scopes_param_name
        or len(dependant.body_params) != 1
        or route.response_field is None
        # FastAPI sends no body with these (204, 304, 1xx): leave them to it.
        or (
            route.status_code is not None and not is_body_allowed_for_status_code(route.status_code)
        )
        or not isinstance(route.response_class, DefaultPlaceholder)
        or not inspect.iscoroutinefunction(dependant.call)
    ):
        return None
    body = dependant.body_params[0]
    body_model = body.field_info.annotation
    if getattr(body.field_info, "embed", None) or not (
        isinstance(body_model, type) and issubclass(body_model, BaseModel)
    ):
        return None
    dependencies: list[tuple[str | None, Resolver]] = []
    for sub in dependant.dependencies:
        resolve = CHEAP_DEPENDENCIES.get(sub.call)
        if resolve is None:
            return None
        dependencies.append((sub.name, resolve))
    return FastPlan(
        endpoint=dependant.call,
        body_name=body.name,
        body_model=body_model,
        request_name=dependant.request_param_name,
        response_name=dependant.response_param_name,
        dependencies=tuple(dependencies),
        route=route,
        plain_model=_plain_model(route),
        takes_query=any(sub.call is get_submit_options for sub in dependant.dependencies),
    )


def _plain_model(route: Any) -> type[BaseModel] | None:
    model = route.response_model
    options = (
        route.response_model_include,
        route.response_model_exclude,
        route.response_model_exclude_unset,
        route.response_model_exclude_defaults,
        route.response_model_exclude_none,
    )
    if any(options) or not (isinstance(model, type) and issubclass(model, BaseModel)):
        return None
    return model


class FastPathRoute(StrictJSONRoute):
    """A route that serves plain requests by its endpoint directly, the rest by FastAPI."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        standard = super().get_route_handler()
        # FastAPI builds a handler per router the route is included in, reading the
        # included view (its dependencies, overrides provider...) from this variable.
        included = _effective_route_context_var.get()
        plan = fast_plan(included if getattr(included, "original_route", None) is self else self)
        if plan is None:
            return standard

        async def handler(request: Request) -> Response:
            # One request object for both: the body is read once and cached on it.
            strict = self.request_class(request.scope, request.receive)
            response = await plan.serve(strict)
            if response is None:
                response = await standard(strict)
            return response

        return handler
