"""What a running task may use: owned by the worker, opened in on_startup, closed on shutdown."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.settings import Settings
from worker.taskkit.status_writer import StatusWriter

if TYPE_CHECKING:
    # Only named here: worker.hop_limits imports this kit's errors.
    from worker.hop_limits import HopLimits

# The key under which on_startup stores the Resources in ARQ's ctx.
RESOURCES_KEY = "throttler_resources"
# Where the worker's ctx holds how many job slots are taken (worker.leases): how many
# writes the status writer can be waiting for at most.
JOB_SLOTS_KEY = "throttler_job_slots"


@dataclass(frozen=True, kw_only=True, slots=True)
class Resources:
    """The worker's shared resources, handed to every task."""

    settings: Settings
    engine: AsyncEngine
    http: httpx.AsyncClient
    executor: ThreadPoolExecutor
    worker_id: str
    # Every job's start and outcome go through it, group-committed with other jobs'.
    status: StatusWriter
    # host: limits on the hosts a download's redirects lead to (worker.hop_limits).
    hops: HopLimits


def resources_from(ctx: dict[Any, Any]) -> Resources:
    """Return the Resources that on_startup put into ARQ's ctx."""
    resources: Resources | None = ctx.get(RESOURCES_KEY)
    if resources is None:
        raise RuntimeError("worker resources missing from ctx: on_startup did not run")
    return resources
