"""Keep a 422's echo of the client's input small, however large the input was.

pydantic puts each offending value in its error's ``input``: for a list or an object,
the whole of it, which for a bulk body can be megabytes, encoded (in Python) and sent
back. Here each ``input`` is clipped to a short preview, built by walking the value only
as far as the preview needs, and a request's errors are capped in number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

# Characters of one input echoed back, and errors listed in one answer.
MAX_ECHO_CHARS = 200
MAX_ERRORS = 50
_ELLIPSIS = "..."


def _preview(value: Any) -> str | None:
    """The start of ``value`` as JSON text, or None when all of it fits the bound."""
    # iterencode without _one_shot yields the text piece by piece, walking lazily.
    encoder = json.JSONEncoder(default=repr, check_circular=False)
    text: list[str] = []
    size = 0
    for piece in encoder.iterencode(value):
        text.append(piece)
        size += len(piece)
        if size > MAX_ECHO_CHARS:
            return "".join(text)[:MAX_ECHO_CHARS] + _ELLIPSIS
    return None


def clip_input(value: Any) -> Any:
    """``value`` itself when short, else a preview of it (a string ending in ``...``)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value if len(value) <= MAX_ECHO_CHARS else value[:MAX_ECHO_CHARS] + _ELLIPSIS
    preview = _preview(value)
    return value if preview is None else preview


def clip_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The first MAX_ERRORS errors, inputs clipped, then one error counting the rest."""
    clipped: list[dict[str, Any]] = []
    rest = 0
    for error in errors:
        if len(clipped) == MAX_ERRORS:
            rest += 1
            continue
        item = dict(error)
        if "input" in item:
            item["input"] = clip_input(item["input"])
        clipped.append(item)
    if rest:
        clipped.append(
            {
                "type": "too_many_errors",
                "loc": ["body"],
                "msg": f"{rest} more errors not listed",
                "input": None,
            }
        )
    return clipped
