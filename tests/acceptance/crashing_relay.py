"""A relay that dies by SIGKILL after its first enqueue, at its first release of rows.

Test-only: ``python -m tests.acceptance.crashing_relay`` with the relay's environment.
The production code has no failpoint; this subclass replaces the release step instead.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence

from relay.__main__ import serve
from relay.relay import Relay
from throttler.logs import configure_logging
from throttler.settings import load_settings
from throttler.store.outbox import OutboxClaim


class CrashingRelay(Relay):
    """Enqueue the first batch, then die exactly where a crash hurts most."""

    async def release(self, claim: OutboxClaim, outbox_ids: Sequence[int]) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    settings = load_settings()
    configure_logging(component="crashing-relay", level=settings.log_level)
    asyncio.run(serve(settings, relay_type=CrashingRelay))


if __name__ == "__main__":
    main()
