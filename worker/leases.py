"""ARQ's worker with short, renewed in-progress leases, so a dead worker's jobs run again soon.

ARQ marks a job it picks up with ``arq:in-progress:<job id>`` (``psetex`` at pickup, deleted
when the job ends) and leaves the job in the queue meanwhile; other workers skip it while
the key exists. ARQ sets that key once, for the largest function timeout + 10 s, so after a
SIGKILL the job waits that long. Here the key gets a short TTL at pickup and is renewed
while the job runs: after a death it lapses within ``lease_s`` and any worker polling the
queue takes the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from arq.constants import in_progress_key_prefix
from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

log = logging.getLogger(__name__)

# How long a running job's in-progress key outlives the last renewal, and how often it is
# renewed. The gap (lease - refresh) is how long the event loop may stall before another
# worker could start the same job; the lease bounds how late a dead worker's job re-runs.
LEASE_S = 3.0
LEASE_REFRESH_S = 1.0

# Redis is away: worth trying again (the service logs the outage, see worker.service).
# redis-py reports a connection lost between WATCH and EXEC as a WatchError; ARQ's
# start_jobs catches the one EXEC raises (another worker took the job) but not that one.
REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    WatchError,
    OSError,
    TimeoutError,
)


class LeasedWorker(Worker):
    """An ``arq.worker.Worker`` whose in-progress keys are short leases renewed while jobs run."""

    def __init__(
        self,
        *args: Any,
        lease_s: float = LEASE_S,
        lease_refresh_s: float = LEASE_REFRESH_S,
        **kwargs: Any,
    ) -> None:
        if not 0 < lease_refresh_s < lease_s:
            raise ValueError(
                f"need 0 < lease_refresh_s < lease_s, got {lease_refresh_s}, {lease_s}"
            )
        super().__init__(*args, **kwargs)
        self.lease_s = lease_s
        self.lease_refresh_s = lease_refresh_s
        # ARQ's TTL at pickup (its only use): the first lease, renewed by renew_leases.
        self.in_progress_timeout_s = lease_s

    def running_job_ids(self) -> list[str]:
        return [job_id for job_id, task in self.tasks.items() if not task.done()]

    async def renew_leases(self) -> None:
        """Push back the expiry of every running job's in-progress key (one round trip)."""
        job_ids = self.running_job_ids()
        if not job_ids:
            return
        lease_ms = int(self.lease_s * 1000)
        # PEXPIRE never creates a key: a job that just finished (key deleted) stays finished.
        async with self.pool.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.pexpire(in_progress_key_prefix + job_id, lease_ms)
            await pipe.execute()

    async def _keep_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_refresh_s)
            try:
                await self.renew_leases()
            except REDIS_DOWN_ERRORS as error:
                # The poll loop fails on the same outage and the service logs it once.
                log.debug("worker.lease_renewal_failed", exc_info=error)

    async def main(self) -> None:
        """Run ARQ's poll loop with the lease renewer beside it."""
        renewer = asyncio.create_task(self._keep_leases())
        try:
            await super().main()
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """ARQ's start_jobs, one id at a time, giving back the job slot a Redis error strands.

        ARQ takes a slot (``sem`` and ``job_counter``) before its WATCH pipeline and frees
        it only on a WatchError or ResponseError: a lost connection there would leak the
        slot for good, and after ``max_jobs`` outages the worker would take no more jobs.
        """
        for job_id in job_ids:
            if self.job_counter >= self.max_jobs:
                return
            try:
                await super().start_jobs([job_id])
            except REDIS_DOWN_ERRORS:
                self.job_counter -= 1
                self.sem.release()
                raise
