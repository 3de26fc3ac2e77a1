"""A batch of ids as ONE SQLite parameter: a JSON array, read back by ``json_each``.

SQLite's fast paths bind a batch this way, so that each statement's SQL is the same
whatever the batch's size (prepared once, kept in sqlite3's statement cache) and binding
costs one string, not one placeholder per id. ``column IN (SELECT value FROM
json_each(?))`` is still a look-up of each id in the column's index
(tests/integration/store/test_attempts_plans.py checks SQLite's plans).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Column, ColumnElement, bindparam, func, select


def ids_in_json(column: Column[Any], name: str = "task_ids") -> ColumnElement[bool]:
    """``column IN (the ids of the JSON array parameter name)``."""
    ids = func.json_each(bindparam(name, value=None)).table_valued("value")
    return column.in_(select(ids.c.value))


def json_ids(ids: Iterable[object]) -> str:
    """The value of an ``ids_in_json`` parameter."""
    return json.dumps(list(ids))
