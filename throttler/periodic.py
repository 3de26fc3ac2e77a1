"""A background job that runs one pass every few seconds until stopped: recovery, pruning."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod

from throttler.errors import RECOVERABLE_ERRORS
from throttler.retry import Outage, pause


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
        """Run passes until ``stop``; a failed pass is logged and retried next interval.

        Only ``RECOVERABLE_ERRORS`` (Redis or the database away) are retried: anything
        else is a bug and ends the loop. An outage logs one line as passes start failing
        (``<name>.error``) and one when a pass works again (``<name>.recovered``).
        """
        outage = Outage(
            self.log, down_event=f"{self.name}.error", up_event=f"{self.name}.recovered"
        )
        while not self.stopping:
            try:
                await self.run_once()
            except RECOVERABLE_ERRORS as error:
                outage.failed(error, retry_in_s=self.interval_s)
            else:
                outage.succeeded()
            await pause(self.interval_s, unless=self._stopping)
