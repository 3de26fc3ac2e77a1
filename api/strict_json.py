"""Parse request bodies as strict JSON: what the standard library tolerates, we refuse.

``json.loads`` accepts ``NaN`` and ``Infinity``, lets a repeated key silently win,
decodes UTF-16 and UTF-32, keeps lone surrogates that cannot be stored, and recurses as
deep as the input goes. Each of those becomes a ``json.JSONDecodeError`` here, which
FastAPI answers with a 422 (``json_invalid``) before any handler runs.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any, ClassVar

from fastapi import HTTPException, Request, Response, status
from fastapi.routing import APIRoute

# Deeper than any task input needs (they are flat objects), shallow enough to walk cheaply.
MAX_JSON_DEPTH = 32
# Larger bodies are parsed in a worker thread: a few megabytes of tiny values take seconds
# of CPU (a Python hook runs per object), which on the event loop would stall every other
# request, /healthz included. A submission's body is far smaller; a bulk one may be larger.
THREAD_PARSE_BYTES = 16 * 1024
_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True, kw_only=True, slots=True)
class ArrayCap:
    """At most ``max_items`` items in the array under the top-level object's ``key``."""

    key: str
    max_items: int


class TooManyItemsError(Exception):
    """The capped array holds more items than its cap; the rest was not parsed."""

    def __init__(self, cap: ArrayCap) -> None:
        super().__init__(f"more than {cap.max_items} items in {cap.key!r}")


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


def _value(decoder: json.JSONDecoder, text: str, index: int) -> tuple[Any, int]:
    try:
        value, end = decoder.scan_once(text, index)  # type: ignore[attr-defined]
    except StopIteration as stop:
        raise json.JSONDecodeError("Expecting value", text, stop.value) from None
    return value, end


def _after(text: str, index: int, closing: str) -> tuple[bool, int]:
    """After a member or item: (True, past ``closing``) at the end, else (False, past ',')."""
    char = text[index : index + 1]
    if char == closing:
        return True, index + 1
    if char != ",":
        raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
    return False, _WHITESPACE.match(text, index + 1).end()  # type: ignore[union-attr]


def _capped_array(
    decoder: json.JSONDecoder, text: str, index: int, cap: ArrayCap
) -> tuple[list[Any], int]:
    """Parse the array whose ``[`` ends before ``index``, item by item, up to the cap."""
    items: list[Any] = []
    index = _WHITESPACE.match(text, index).end()  # type: ignore[union-attr]
    if text[index : index + 1] == "]":
        return items, index + 1
    while True:
        if len(items) == cap.max_items:
            raise TooManyItemsError(cap)
        item, index = _value(decoder, text, index)
        items.append(item)
        index = _WHITESPACE.match(text, index).end()  # type: ignore[union-attr]
        done, index = _after(text, index, "]")
        if done:
            return items, index


def _capped_document(decoder: json.JSONDecoder, text: str, cap: ArrayCap) -> Any:
    """Parse ``text``, the capped array counted as it is parsed, not after.

    The top-level object is walked member by member (each value parsed whole by the
    decoder's own C scanner), the capped array item by item: its first item past the cap
    stops the parse, so a body of a million tiny items costs as little as one of
    ``max_items``. Any other top-level value is parsed as a whole.
    """
    match = _WHITESPACE.match
    index = match(text, 0).end()  # type: ignore[union-attr]
    if text[index : index + 1] != "{":
        return decoder.decode(text)
    pairs: list[tuple[str, Any]] = []
    index = match(text, index + 1).end()  # type: ignore[union-attr]
    done = text[index : index + 1] == "}"
    if done:
        index += 1
    while not done:
        if text[index : index + 1] != '"':
            raise json.JSONDecodeError(
                "Expecting property name enclosed in double quotes", text, index
            )
        key, index = scanstring(text, index + 1)
        index = match(text, index).end()  # type: ignore[union-attr]
        if text[index : index + 1] != ":":
            raise json.JSONDecodeError("Expecting ':' delimiter", text, index)
        index = match(text, index + 1).end()  # type: ignore[union-attr]
        if key == cap.key and text[index : index + 1] == "[":
            value, index = _capped_array(decoder, text, index + 1, cap)
        else:
            value, index = _value(decoder, text, index)
        pairs.append((key, value))
        index = match(text, index).end()  # type: ignore[union-attr]
        done, index = _after(text, index, "}")
    if match(text, index).end() != len(text):  # type: ignore[union-attr]
        raise json.JSONDecodeError("Extra data", text, index)
    return _unique_keys(pairs)


def parse_strict_json(body: bytes, *, cap: ArrayCap | None = None) -> Any:
    """Parse a UTF-8 JSON document; raise ``json.JSONDecodeError`` for anything dubious.

    With ``cap``, raise ``TooManyItemsError`` as soon as the capped array overflows.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise json.JSONDecodeError("body is not valid UTF-8", "", error.start) from None
    try:
        # A decoder per document: its scanner is not safe to share between threads.
        decoder = json.JSONDecoder(
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
        document = decoder.decode(text) if cap is None else _capped_document(decoder, text, cap)
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
    """A request whose ``json()`` is ``parse_strict_json``, with the class's ``array_cap``.

    Too many items is a 413, as an oversized body is.
    """

    array_cap: ClassVar[ArrayCap | None] = None

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                if len(body) > THREAD_PARSE_BYTES:
                    self._json = await asyncio.to_thread(
                        parse_strict_json, body, cap=self.array_cap
                    )
                else:
                    self._json = parse_strict_json(body, cap=self.array_cap)
            except TooManyItemsError as error:
                raise HTTPException(
                    status_code=status.HTTP_413_CONTENT_TOO_LARGE, detail=str(error)
                ) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """Route class whose handlers see ``request_class`` (strict JSON) bodies."""

    request_class: ClassVar[type[StrictJSONRequest]] = StrictJSONRequest

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            if not isinstance(request, self.request_class):  # a fast path may have made one
                request = self.request_class(request.scope, request.receive)
            return await handler(request)

        return strict_handler
