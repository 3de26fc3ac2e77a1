"""Run the worker as a service: ride out Redis outages, stop gracefully on SIGTERM or SIGINT.

ARQ's own loop ends with an exception when Redis goes away, and its signal handler cancels
running jobs at once. Here the loop is restarted once Redis answers again (running jobs
carry on meanwhile), and a signal first stops new pickups, then gives running jobs a grace
period, and only then cancels what is left: each cut-short attempt puts its task back in
the outbox (worker.taskkit.runner), so the relay releases the next attempt under the
limits; the job ARQ re-queues (``retry_jobs``) then starts nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis

from throttler.errors import REDIS_ERRORS
from throttler.logs import fields
from throttler.nodes import Heartbeat, Node, NodeKind, NodeRegistry
from throttler.redis_conn import RedisMisconfigured, connect_arq
from throttler.retry import REDIS_PROBE, Backoff, Outage, pause, retry_until_done
from throttler.settings import Settings
from worker.app import build_worker, close_worker, worker_id
from worker.leases import LEASE_REFRESH_S, LEASE_S, LeasedWorker
from worker.taskkit import TaskBase
from worker.tasks import DEFAULT_TASKS

log = logging.getLogger("worker")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# How long ARQ's loop gets to leave by itself at a stop before it is cancelled.
LOOP_EXIT_S = 5.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Supervision:
    """How the service waits for Redis, keeps leases and stops."""

    # After a stop signal: how long running jobs may take before they are cancelled.
    shutdown_grace_s: float
    # Pauses between Redis connection attempts and pings while Redis is away.
    redis_reconnect: Backoff = REDIS_PROBE
    # The in-progress lease of each running job, and how often it is renewed.
    lease_s: float = LEASE_S
    lease_refresh_s: float = LEASE_REFRESH_S

    @classmethod
    def from_settings(cls, settings: Settings) -> Supervision:
        """Take the grace and the lease from WORKER_SHUTDOWN_GRACE_S and WORKER_LEASE_S."""
        return cls(
            shutdown_grace_s=settings.worker_shutdown_grace_s,
            lease_s=settings.worker_lease_s,
            # Renew three times per lease: two renewals may be late before it lapses.
            lease_refresh_s=settings.worker_lease_s / 3,
        )


class WorkerService:
    """One worker process: a LeasedWorker, restarted across Redis outages, stopped gently."""

    def __init__(
        self,
        settings: Settings,
        *,
        tasks: Sequence[type[TaskBase[Any, Any]]] = DEFAULT_TASKS,
        supervision: Supervision | None = None,
    ) -> None:
        self.settings = settings
        self.tasks = tasks
        self.supervision = supervision or Supervision.from_settings(settings)
        # One log line when Redis goes away and one when it is back, not one per try.
        self.redis_outage = Outage(
            log, down_event="worker.redis_unavailable", up_event="worker.redis_restored"
        )
        # ARQ's loop failing on Redis errors while Redis answers pings: not an outage.
        self.loop_failing = Outage(
            log, down_event="worker.loop_failing", up_event="worker.loop_recovered"
        )
        # Set by the first stop signal; a second one skips what is left of the grace.
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()

    def request_stop(self, sig: signal.Signals | None = None) -> None:
        name = sig.name if sig is not None else "request"
        if self.stopping.is_set():
            log.info("worker.stop_now", extra=fields(signal=name))
            self.hurry.set()
            return
        log.info(
            "worker.stop_requested",
            extra=fields(signal=name, grace_s=self.supervision.shutdown_grace_s),
        )
        self.stopping.set()

    async def run(self) -> None:
        """Serve until a stop is requested; return once everything is closed."""
        pool = await self._connect()
        if pool is None:
            return
        worker = build_worker(
            self.settings,
            tasks=self.tasks,
            redis_pool=pool,
            lease_s=self.supervision.lease_s,
            lease_refresh_s=self.supervision.lease_refresh_s,
        )
        log.info(
            "worker.ready",
            extra=fields(
                queue=self.settings.arq_queue_name,
                concurrency=self.settings.worker_concurrency,
                functions=",".join(worker.functions),
            ),
        )
        # Listed in the node registry with its running jobs until it has drained.
        heartbeat = Heartbeat(
            registry=NodeRegistry(pool),
            node=Node.this_process(NodeKind.WORKER, worker_id()),
            log=log,
            running=lambda: len(worker.running_job_ids()),
        )
        heartbeat_task = asyncio.create_task(heartbeat.run())
        loop_task = asyncio.create_task(self._supervise(worker))
        stop_task = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({loop_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if loop_task.done():
                loop_task.result()  # ARQ's loop ended on an error that is not an outage
            else:
                await self._drain(worker)
                # Let ARQ's loop leave at its next poll, as a burst worker with nothing
                # left to do: cancelling it inside a Redis pipeline strands the pipeline.
                worker.burst = True
                worker.max_burst_jobs = 0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(loop_task), timeout=LOOP_EXIT_S)
        finally:
            stop_task.cancel()
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
            # Deregisters while the pool is still open.
            heartbeat.stop()
            try:
                await heartbeat_task
            finally:
                await close_worker(worker)

    async def _connect(self) -> ArqRedis | None:
        """Open the Redis pool, retrying until Redis answers; None if stopped first."""
        # Our loop retries for ever with backoff and logs once; ARQ's gives up after 5 tries.
        # A refused password or certificate is not retried: RedisMisconfigured ends the start.
        return await retry_until_done(
            lambda: connect_arq(self.settings),
            retry_on=REDIS_ERRORS,
            backoff=self.supervision.redis_reconnect,
            outage=self.redis_outage,
            stopping=self.stopping,
        )

    async def _supervise(self, worker: LeasedWorker) -> None:
        """Run ARQ's loop; after it fails on a Redis error, wait for Redis, then run it again.

        Jobs already running are separate tasks and carry on through an outage; ARQ's
        final Redis step for a job that ends meanwhile fails, the job keeps that error to
        itself (``LeasedWorker.run_job``), and its keys go with its lease.

        Whether Redis is away is judged by a ping, not by the loop's error: an outage is
        logged when a ping fails and ends when one answers. The pings come at most
        ``redis_reconnect.max_s`` apart, so pickups resume within that of Redis answering.
        """
        backoff = self.supervision.redis_reconnect
        delays = backoff.delays()
        while True:
            worker.main_task = asyncio.create_task(worker.main())
            ended, _ = await asyncio.wait({worker.main_task}, timeout=backoff.max_s)
            if not ended:
                # The loop runs: a later failure starts the pauses afresh.
                self.loop_failing.succeeded()
                delays = backoff.delays()
            try:
                await worker.main_task
                return
            except REDIS_ERRORS as error:
                loop_error = error
            while True:
                try:
                    await worker.pool.ping()
                except REDIS_ERRORS as error:
                    delay_s = next(delays)
                    self.redis_outage.failed(error, retry_in_s=round(delay_s, 3))
                    if await pause(delay_s, unless=self.stopping):
                        return
                    continue
                break
            if self.redis_outage.down:
                self.redis_outage.succeeded()
                continue
            # Redis answers, yet the loop failed on a Redis error (a reply it refuses, as
            # from a full Redis): not an outage. Restart after a pause that grows while
            # this repeats, so a loop that fails at once does not spin.
            delay_s = next(delays)
            self.loop_failing.failed(loop_error, retry_in_s=round(delay_s, 3))
            if await pause(delay_s, unless=self.stopping):
                return

    async def _drain(self, worker: LeasedWorker) -> None:
        """Stop pickups, let running jobs finish within the grace, cancel the rest."""
        # ARQ's loop keeps running (lease renewal, clean-up of finished jobs) but takes no
        # new job; a job it was starting at this very moment is waited for as well.
        worker.allow_pick_jobs = False
        grace_s = self.supervision.shutdown_grace_s
        deadline = time.monotonic() + grace_s
        log.info(
            "worker.stopping",
            extra=fields(running=len(worker.running_job_ids()), grace_s=grace_s),
        )
        hurry = asyncio.create_task(self.hurry.wait())
        try:
            while running := [task for task in worker.tasks.values() if not task.done()]:
                left_s = deadline - time.monotonic()
                if left_s <= 0 or self.hurry.is_set():
                    break
                await asyncio.wait(
                    {*running, hurry}, timeout=left_s, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            hurry.cancel()
        left = worker.running_job_ids()
        if left:
            # Each cancelled attempt puts its task back in the outbox (requeued) before its
            # job goes back to ARQ, where it starts nothing; a side-effecting task that had
            # started ends failed instead (worker.taskkit.runner).
            log.warning(
                "worker.cancelling_jobs",
                extra=fields(count=len(left), task_ids=",".join(left), grace_s=grace_s),
            )
            cancelled = [worker.tasks[job_id] for job_id in left]
            for task in cancelled:
                task.cancel()
            await asyncio.gather(*cancelled, return_exceptions=True)


async def serve(
    settings: Settings,
    *,
    tasks: Sequence[type[TaskBase[Any, Any]]] = DEFAULT_TASKS,
    supervision: Supervision | None = None,
) -> None:
    """Run the worker until SIGTERM or SIGINT; return once it has stopped and closed."""
    service = WorkerService(settings, tasks=tasks, supervision=supervision)
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, service.request_stop, sig)
    log.info(
        "worker.starting",
        extra=fields(
            queue=settings.arq_queue_name,
            concurrency=settings.worker_concurrency,
            shutdown_grace_s=service.supervision.shutdown_grace_s,
            lease_s=service.supervision.lease_s,
        ),
    )
    try:
        await service.run()
    except RedisMisconfigured as error:
        # A refused password or certificate: one line naming the setting, exit status 2.
        log.error("worker.redis_misconfigured", extra=fields(error=str(error)))  # noqa: TRY400 - one line, no traceback
        raise SystemExit(2) from None
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    log.info("worker.stopped")
