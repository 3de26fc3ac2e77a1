"""Query parameters held to a body's strictness, checked on the raw query string.

FastAPI parses query values in pydantic's lax mode: it takes "5.0", "1_000", "+5", " 5"
or non-ASCII digits for an integer and an epoch number for a time, keeps the last of a
repeated single-valued parameter, and ignores a parameter it does not know (a misspelt
``?delay=30`` would run the task at once; ``?state=failed`` would list everything).
``QuerySpelling.check`` refuses all of these with a 422 shaped like FastAPI's own,
naming the parameter.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

# As strict as a JSON body: none of our integer parameters is negative.
PLAIN_DIGITS = re.compile(r"[0-9]+")
# ISO-8601 date and time with a timezone, nothing around it: never a bare epoch number.
ISO_TIME_WITH_ZONE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?(Z|[+-][0-9]{2}:[0-9]{2})",
    re.IGNORECASE,
)


def query_error(name: str, kind: str, message: str, value: Any) -> RequestValidationError:
    """A 422 shaped like FastAPI's own, naming one query parameter."""
    return RequestValidationError(
        [{"type": kind, "loc": ("query", name), "msg": message, "input": value}]
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class QuerySpelling:
    """Which parameters an endpoint takes, which are integers or times, which may repeat."""

    names: frozenset[str]
    integers: frozenset[str] = frozenset()
    times: frozenset[str] = frozenset()
    repeatable: frozenset[str] = frozenset()

    def check(self, request: Request) -> None:
        """Refuse unknown, repeated or laxly spelt parameters: one error per parameter."""
        items = request.query_params.multi_items()
        counts = Counter(name for name, _ in items)
        errors: dict[str, RequestValidationError] = {}
        for name, value in items:
            error = self._error(name, value, given_times=counts[name])
            if error is not None:
                # The first found for each parameter.
                errors.setdefault(name, error)
        if errors:
            raise RequestValidationError([e for error in errors.values() for e in error.errors()])

    def _error(self, name: str, value: str, *, given_times: int) -> RequestValidationError | None:
        """The error for one raw parameter, or None when it is spelt as it must be."""
        if name not in self.names:
            return query_error(name, "extra_forbidden", "Extra inputs are not permitted", value)
        if given_times > 1 and name not in self.repeatable:
            # Taking the first or the last would silently drop what the client also asked for.
            return query_error(
                name, "value_error", f"{name} is given more than once; give it once", value
            )
        if name in self.integers and not PLAIN_DIGITS.fullmatch(value):
            return query_error(
                name, "int_parsing", "Input should be an integer in plain decimal digits", value
            )
        if name in self.times and not ISO_TIME_WITH_ZONE.fullmatch(value):
            return query_error(
                name, "datetime_parsing", "Input should be an ISO-8601 time with a timezone", value
            )
        return None
