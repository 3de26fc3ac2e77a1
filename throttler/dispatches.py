"""What the database knows of past dispatches, for a limiter that lost its buckets."""

from __future__ import annotations

from functools import partial

from throttler.store.recovery import RecoveryStore
from throttler.throttle import LastDispatch


async def last_dispatch_s(store: RecoveryStore) -> float | None:
    """The latest ``queued_at`` of any task as POSIX seconds (None: nothing dispatched yet).

    ``queued_at`` is the moment a task may start, which the relay sets up to its reserve
    horizon ahead, so this covers every token the buckets lent. Asked only when Redis has
    lost the drain floor (a restart), never per claim.
    """
    latest = await store.last_dispatch_at()
    return None if latest is None else latest.timestamp()


def last_dispatch_from(store: RecoveryStore) -> LastDispatch:
    """``last_dispatch_s`` bound to a store, as the limiter asks for it."""
    return partial(last_dispatch_s, store)
