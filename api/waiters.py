"""Long-poll waiters: wake the requests waiting on a task as soon as it is terminal.

Each API process keeps one registry, task id to the events of the requests waiting on
it. Two background jobs owned by the lifespan set those events:

- ``FinishedListener``: ONE Redis pub/sub subscription to ``FINISHED_CHANNEL``, where
  workers and reconcilers publish a task id once its terminal status is committed
  (throttler.finished). It reconnects with backoff when Redis goes away.
- ``FinishedSweep``: pub/sub loses messages (Redis restarted, subscriber reconnecting), so
  every second ONE read (a statement per 500 ids) asks which waited tasks are terminal.

A waiter reads its task when it starts and again when woken or at its deadline; waiting
itself costs the database nothing, whatever the number of waiters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator

from redis.asyncio import Redis
from starlette.requests import Request

from throttler.constants import FINISHED_CHANNEL
from throttler.periodic import Periodic
from throttler.pubsub import LISTEN_POLL_S, ChannelListener
from throttler.retry import REDIS_RECONNECT
from throttler.store.reads import ReadStore, TaskView

log = logging.getLogger(__name__)

# The longest a client may ask the result endpoint to wait.
MAX_WAIT_S = 30.0
# How often the sweep asks the database which waited tasks are terminal: the longest a
# waiter answers late when its announcement was lost.
SWEEP_INTERVAL_S = 1.0


class Waiters:
    """Task id to the events of the requests waiting on it; one per API process."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    def __len__(self) -> int:
        """Return the number of waiting requests."""
        return sum(len(events) for events in self._events.values())

    def task_ids(self) -> list[str]:
        """Return the ids some request is waiting on."""
        return list(self._events)

    @contextlib.contextmanager
    def watch(self, task_id: str) -> Iterator[asyncio.Event]:
        """Register a waiter on ``task_id`` for the block; its event is set on wake-up."""
        event = asyncio.Event()
        self._events.setdefault(task_id, set()).add(event)
        try:
            yield event
        finally:
            # Runs on answer, timeout, disconnect and cancellation alike: nothing leaks.
            events = self._events.get(task_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._events[task_id]

    def wake(self, task_ids: Iterable[str]) -> int:
        """Set the events of every waiter on these ids; return how many were woken."""
        woken = 0
        for task_id in task_ids:
            for event in self._events.get(task_id, ()):
                event.set()
                woken += 1
        return woken


class FinishedListener(ChannelListener):
    """Wake waiters from ``FINISHED_CHANNEL``; run until stopped, resubscribing as needed."""

    def __init__(
        self,
        *,
        redis: Redis,
        waiters: Waiters,
        poll_s: float = LISTEN_POLL_S,
        backoff_s: float = REDIS_RECONNECT.first_s,
        backoff_max_s: float = REDIS_RECONNECT.max_s,
    ) -> None:
        self.waiters = waiters
        super().__init__(
            redis=redis,
            channels=[FINISHED_CHANNEL],
            on_message=self._wake,
            event="waiters",
            log=log,
            poll_s=poll_s,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
        )

    def _wake(self, data: bytes) -> None:
        self.waiters.wake([data.decode()])


class FinishedSweep(Periodic):
    """Once a second, wake the waiters of tasks found terminal: lost announcements."""

    name = "waiters.sweep"

    def __init__(
        self, *, reads: ReadStore, waiters: Waiters, interval_s: float = SWEEP_INTERVAL_S
    ) -> None:
        super().__init__(interval_s=interval_s, log=log)
        self.reads = reads
        self.waiters = waiters

    async def run_once(self) -> None:
        task_ids = self.waiters.task_ids()
        if task_ids:
            self.waiters.wake(await self.reads.terminal_task_ids(task_ids))


async def long_poll(
    read: Callable[[], Awaitable[TaskView | None]],
    *,
    task_id: str,
    wait_s: float,
    waiters: Waiters,
    request: Request,
) -> TaskView | None:
    """Read the task; unless it is terminal, wait up to ``wait_s`` for it, then read again.

    None means unknown (to this account). The database is read once at the start and once
    per wake-up (a wake-up means the task is terminal) or at the deadline.
    """
    if wait_s <= 0:
        return await read()
    deadline = asyncio.get_running_loop().time() + wait_s
    # Register before the first read: a task finishing in between still wakes this waiter.
    with waiters.watch(task_id) as woken:
        task = await read()
        if task is None or task.status.is_terminal:
            return task
        hung_up = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, woken=woken, hung_up=hung_up))
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        await woken.wait()
                except TimeoutError:
                    return await read()
                if hung_up.is_set():
                    return task  # nobody is left to answer
                woken.clear()
                task = await read()
                if task is None or task.status.is_terminal:
                    return task
        finally:
            watcher.cancel()


async def _watch_disconnect(
    request: Request, *, woken: asyncio.Event, hung_up: asyncio.Event
) -> None:
    """Wake the waiter once the client hangs up, so it stops waiting at once."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            hung_up.set()
            woken.set()
            return
