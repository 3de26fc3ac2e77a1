"""A background job that runs one pass every few seconds until stopped: recovery, pruning."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from throttler.logs import fields

# A pass that fails for these is logged and tried again next interval; anything else is
# a bug and ends the loop.
RECOVERABLE_ERRORS = (SQLAlchemyError, RedisError, OSError, TimeoutError)


class Periodic(ABC):
    """Call ``run_once`` every ``interval_s`` seconds until ``stop``."""

    name = "periodic"

    def __init__(self, *, interval_s: float, log: logging.Logger) -> None:
        self.interval_s = interval_s
        self.log = log
        self._stopping = asyncio.Event()

    @abstractmethod
    async def run_once(self) -> None:
        """Do one pass."""

    def stop(self) -> None:
        """Finish the pass in hand, then return from ``run``."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Run passes until ``stop``; a failed pass is logged and retried next interval."""
        while not self.stopping:
            try:
                await self.run_once()
            except RECOVERABLE_ERRORS as error:
                self.log.error(  # noqa: TRY400 - one line per failure, no traceback
                    f"{self.name}.error",
                    extra=fields(
                        error=f"{type(error).__name__}: {error}".splitlines()[0],
                        retry_in_s=self.interval_s,
                    ),
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.interval_s)
