"""``python -m worker``: run one ARQ worker until SIGINT or SIGTERM (see worker.service)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from throttler import event_loop
from throttler.logs import configure_logging, fields
from throttler.settings import Settings, load_settings
from worker.metrics import serve_metrics
from worker.service import Supervision, serve
from worker.taskkit import TaskBase
from worker.tasks import DEFAULT_TASKS

log = logging.getLogger("worker")


def run(
    settings: Settings,
    *,
    tasks: Sequence[type[TaskBase[Any, Any]]] = DEFAULT_TASKS,
    supervision: Supervision | None = None,
) -> None:
    """Serve until stopped, then exit the process without waiting for stuck task threads."""
    event_loop.run(serve(settings, tasks=tasks, supervision=supervision))
    stuck = [
        thread
        for thread in threading.enumerate()
        if thread is not threading.main_thread() and not thread.daemon
    ]
    if stuck:
        # A blocking task cut short at shutdown keeps its thread until its call returns,
        # and Python would wait for it before exiting. Its job is already back in the
        # queue (or its lease lapses), so nothing is lost by leaving now.
        log.warning("worker.abandoning_threads", extra=fields(count=len(stuck)))
        logging.shutdown()
        os._exit(0)


def main() -> None:
    settings = load_settings()
    configure_logging(component="worker", level=settings.log_level)
    serve_metrics(settings.worker_metrics_port)
    run(settings)


if __name__ == "__main__":
    main()
