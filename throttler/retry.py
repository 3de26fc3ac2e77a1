"""One way to wait and try again: backoff policies, outage logging, stoppable pauses.

Every loop that retries (relay steps, Redis connects and pub/sub resubscribes, the
worker's supervisor, result writes) takes its delays from a ``Backoff`` and reports
through an ``Outage``: one log line when it starts failing, one when it has recovered,
DEBUG lines in between, so an outage of an hour is two lines, not thousands.
The retry delays of *tasks* are another matter (``worker.taskkit.backoff``): those are
per attempt and stored with the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from throttler.logs import fields

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True, slots=True)
class Backoff:
    """Exponential delays: ``first_s``, then times ``multiplier`` each try, capped at ``max_s``.

    ``jitter`` (0 to 1) takes up to that fraction off each delay at random, so processes
    that failed together do not come back in step.
    """

    first_s: float
    max_s: float
    multiplier: float = 2.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ValueError(f"need 0 < first_s <= max_s, got {self.first_s}, {self.max_s}")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("need multiplier >= 1 and 0 <= jitter <= 1")

    def delays(self, rng: Callable[[], float] = random.random) -> Iterator[float]:
        """The delays before each next try, for ever."""
        delay_s = self.first_s
        while True:
            yield delay_s * (1 - self.jitter * rng())
            delay_s = min(delay_s * self.multiplier, self.max_s)


# The policies in use, in one place.
# Redis connects and pub/sub resubscribes: back quickly after a blip, at most every 5 s.
REDIS_RECONNECT = Backoff(first_s=0.1, max_s=5.0)
# A worker pinging Redis while it is away: work resumes within max_s of Redis answering.
REDIS_PROBE = Backoff(first_s=0.1, max_s=0.5)
# A relay step that failed (database or Redis away).
RELAY_STEP = Backoff(first_s=0.1, max_s=10.0)
# A worker's write of a start or an outcome: it must get through, soon after the outage.
RESULT_WRITE = Backoff(first_s=0.2, max_s=2.0)


class Outage:
    """Log one line when something starts failing and one when it works again.

    ``successes_to_recover`` successes in a row end an outage (a flapping dependency
    stays one outage). Failures in between log at DEBUG, as ``retry_event`` if given
    (``down_event`` otherwise), so a loop keeps the names its operators grep for.
    """

    def __init__(
        self,
        log: logging.Logger,
        *,
        down_event: str,
        up_event: str,
        retry_event: str | None = None,
        successes_to_recover: int = 1,
        **context: Any,
    ) -> None:
        self.log = log
        self.down_event = down_event
        self.up_event = up_event
        self.retry_event = retry_event or down_event
        self.successes_to_recover = successes_to_recover
        self.context = context
        self.down_since: float | None = None
        self.failures = 0
        self._successes = 0

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, error: BaseException, *, retry_in_s: float | None = None) -> None:
        """Record a failed try: WARNING the first time, DEBUG while the outage lasts."""
        self._successes = 0
        self.failures += 1
        described = f"{type(error).__name__}: {error}".splitlines()[0]
        level, event = logging.DEBUG, self.retry_event
        if self.down_since is None:
            self.down_since = time.monotonic()
            level, event = logging.WARNING, self.down_event
        self.log.log(
            level,
            event,
            extra=fields(
                **self.context,
                error=described,
                retry_in_s="-" if retry_in_s is None else retry_in_s,
            ),
        )

    def succeeded(self) -> None:
        """Record a successful try; ends the outage once enough came in a row."""
        if self.down_since is None:
            return
        self._successes += 1
        if self._successes < self.successes_to_recover:
            return
        self.log.warning(
            self.up_event,
            extra=fields(
                **self.context,
                down_s=round(time.monotonic() - self.down_since, 3),
                failed_tries=self.failures,
            ),
        )
        self.down_since = None
        self.failures = 0
        self._successes = 0


async def pause(seconds: float, *, unless: asyncio.Event) -> bool:
    """Sleep ``seconds`` unless ``unless`` is set first; return whether it is set."""
    if seconds > 0 and not unless.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(unless.wait(), timeout=seconds)
    return unless.is_set()


async def retry_until_done(
    attempt: Callable[[], Awaitable[T]],
    *,
    retry_on: tuple[type[BaseException], ...],
    backoff: Backoff,
    outage: Outage,
    stopping: asyncio.Event,
) -> T | None:
    """Call ``attempt`` until it returns, pausing on ``retry_on`` errors; None if stopped."""
    delays = backoff.delays()
    while not stopping.is_set():
        try:
            result = await attempt()
        except retry_on as error:
            delay_s = next(delays)
            outage.failed(error, retry_in_s=round(delay_s, 3))
            if await pause(delay_s, unless=stopping):
                return None
            continue
        outage.succeeded()
        return result
    return None
