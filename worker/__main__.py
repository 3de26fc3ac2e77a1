"""``python -m worker``: run one ARQ worker until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from throttler.logs import configure_logging, fields
from throttler.settings import Settings, load_settings
from worker.app import build_worker, close_worker

log = logging.getLogger("worker")


async def serve(settings: Settings) -> None:
    """Run the worker; return once a signal has stopped it and everything is closed."""
    worker = build_worker(settings)
    log.info(
        "worker.starting",
        extra=fields(
            queue=settings.arq_queue_name,
            concurrency=settings.worker_concurrency,
            functions=",".join(worker.functions),
        ),
    )
    try:
        # ARQ's SIGINT/SIGTERM handler cancels running jobs (they are re-queued) and then
        # its main task: that cancellation is the normal way out.
        with contextlib.suppress(asyncio.CancelledError):
            await worker.async_run()
    finally:
        await close_worker(worker)
    log.info("worker.stopped")


def main() -> None:
    settings = load_settings()
    configure_logging(component="worker", level=settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
