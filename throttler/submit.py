"""A new task as the API accepts it, and its id; the store writes it
(``throttler.store.intake``: a task row, its outbox row and its ``submitted`` event)."""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
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


def request_digest(
    *,
    name: str,
    payload: Mapping[str, Any],
    priority: int,
    delay_s: int | None,
    run_at: datetime | None,
    labels: Sequence[str] = (),
) -> str:
    """What makes two submissions under one idempotency key "the same request".

    The request as sent (its kind, validated input and options), not as resolved: a
    ``delay_s`` gives a different due time each time it is sent, and a retry of it is
    still the same request. A single submit and a bulk item that say the same agree.
    ``labels`` (sorted) count only when given: a request without labels hashes as it did
    before labels existed, so its replays still match the hashes stored then.
    """
    sent: dict[str, Any] = {
        "name": name,
        "input": payload,
        "priority": priority,
        "delay_s": delay_s,
        "run_at": None if run_at is None else run_at.astimezone(UTC).isoformat(),
    }
    if labels:
        sent["keys"] = sorted(labels)
    canonical = json.dumps(sent, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


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
    # The client's Idempotency-Key (unique per account), and ``request_digest`` of the
    # request it came with; both None without a key.
    idempotency_key: str | None = None
    request_hash: str | None = None
    # Its labels (throttler.labels), sorted; () for none, which writes no label rows.
    labels: tuple[str, ...] = ()
    task_id: str = field(default_factory=new_task_id)
