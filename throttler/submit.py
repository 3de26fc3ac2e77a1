"""A new task as the API accepts it, and its id; the store writes it
(``throttler.store.intake``: a task row, its outbox row and its ``submitted`` event)."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from throttler.constants import DEFAULT_PRIORITY

# RFC 9562 version 7: 48 bits of Unix time in milliseconds, then 74 random bits (the
# other 6 name the version and variant).
_UUID7_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_UUID7_MARKS = (0x7 << 76) | (0x2 << 62)


def new_task_id() -> str:
    """A new task id: a UUID (version 7) that sorts by creation time.

    Time-ordered ids land at the right edge of every index keyed by task id (tasks,
    outbox, task_events) instead of on a random page each: on SQLite that halves the
    pages a batch dirties and so its insert and commit cost. The 74 random bits need to
    be unique, not secret (a task is only ever read within its own account), so they come
    from ``random`` (reseeded in forked children), not ``os.urandom``: a system call per
    id, which lets the intake writer's thread take the GIL mid-request.
    """
    value = (time.time_ns() // 1_000_000) << 80 | random.getrandbits(80)
    return str(uuid.UUID(int=value & _UUID7_CLEAR | _UUID7_MARKS))


@dataclass(frozen=True, kw_only=True, slots=True)
class NewTask:
    """A validated submission, ready to insert (``throttler.store.intake`` writes many at once)."""

    name: str
    account: str
    payload: Mapping[str, Any]
    created_at: datetime
    priority: int = DEFAULT_PRIORITY
    host: str | None = None
    run_at: datetime | None = None
    task_id: str = field(default_factory=new_task_id)
