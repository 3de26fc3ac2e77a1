"""Parse request bodies as strict JSON: what the standard library tolerates, we refuse.

``json.loads`` accepts ``NaN`` and ``Infinity``, lets a repeated key silently win,
decodes UTF-16 and UTF-32, keeps lone surrogates that cannot be stored, and recurses as
deep as the input goes. Each of those becomes a ``json.JSONDecodeError`` here, which
FastAPI answers with a 422 (``json_invalid``) before any handler runs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

# Deeper than any task input needs (they are flat objects), shallow enough to walk cheaply.
MAX_JSON_DEPTH = 32


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]!r} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise ValueError(f"duplicate key {key[:50]!r}")
        document[key] = value
    return document


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("string holds a lone surrogate (\\ud800-\\udfff)") from None


def _check_tree(document: Any) -> None:
    """Reject nesting past MAX_JSON_DEPTH and strings no database can store."""
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_text(node)
        elif isinstance(node, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(node, dict):
                for key in node:
                    _check_text(key)
                children = list(node.values())
            else:
                children = node
            stack.extend((child, depth + 1) for child in children)


def parse_strict_json(body: bytes) -> Any:
    """Parse a UTF-8 JSON document; raise ``json.JSONDecodeError`` for anything dubious."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise json.JSONDecodeError("body is not valid UTF-8", "", error.start) from None
    try:
        document = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
        _check_tree(document)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError(f"nested deeper than {MAX_JSON_DEPTH} levels", "", 0) from None
    except ValueError as error:
        # Also integers past Python's digit limit (sys.get_int_max_str_digits).
        raise json.JSONDecodeError(str(error).splitlines()[0][:200], "", 0) from None
    return document


class StrictJSONRequest(Request):
    """A request whose ``json()`` is ``parse_strict_json``."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_strict_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """Route class whose handlers see ``StrictJSONRequest`` bodies."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            if not isinstance(request, StrictJSONRequest):  # a fast path may have made one
                request = StrictJSONRequest(request.scope, request.receive)
            return await handler(request)

        return strict_handler
