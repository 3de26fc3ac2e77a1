"""ARQ's worker with short, renewed in-progress leases, so a dead worker's jobs run again soon.

ARQ marks a job it picks up with ``arq:in-progress:<job id>`` (``psetex`` at pickup, deleted
when the job ends) and leaves the job in the queue meanwhile; other workers skip it while
the key exists. ARQ sets that key once, for the largest function timeout + 10 s, so after a
SIGKILL the job waits that long. Here the key gets a short TTL at pickup and is renewed
while the job runs: after a death it lapses within ``lease_s`` and any worker polling the
queue takes the job.

Pickup itself is batched: one atomic script call takes the in-progress keys of as many due
jobs as there are free slots, with ARQ's own checks, where ARQ spends three round trips per
job (see ``LeasedWorker.start_jobs``). A reply lost to a Redis failure leaves keys that
lapse within ``lease_s``; their jobs then run as after a death.

Aborts (``throttler.aborts``, a cancelled task's running attempt) are looked for beside
the poll loop too, every ``abort_check_s``, only for the jobs this worker runs: ARQ's own
check sits in the poll loop, which waits while every slot is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

from arq.constants import in_progress_key_prefix
from arq.utils import timestamp_ms
from arq.worker import Worker
from redis.commands.core import AsyncScript

from throttler.aborts import ABORT_CHECK_S, ABORT_KEY
from throttler.errors import REDIS_ERRORS
from throttler.logs import fields
from worker.pipelines import BatchingPool
from worker.taskkit.registry import ABORTING_KEY
from worker.taskkit.resources import JOB_SLOTS_KEY

log = logging.getLogger(__name__)

# How long a running job's in-progress key outlives the last renewal, and how often it is
# renewed. The gap (lease - refresh) is how long the event loop may stall before another
# worker could start the same job; the lease bounds how late a dead worker's job re-runs.
LEASE_S = 3.0
LEASE_REFRESH_S = 1.0


class LeasedWorker(Worker):
    """An ``arq.worker.Worker`` whose in-progress keys are short leases renewed while jobs run."""

    def __init__(
        self,
        *args: Any,
        lease_s: float = LEASE_S,
        lease_refresh_s: float = LEASE_REFRESH_S,
        abort_check_s: float = ABORT_CHECK_S,
        **kwargs: Any,
    ) -> None:
        if not 0 < lease_refresh_s < lease_s:
            raise ValueError(
                f"need 0 < lease_refresh_s < lease_s, got {lease_refresh_s}, {lease_s}"
            )
        super().__init__(*args, **kwargs)
        self.lease_s = lease_s
        self.lease_refresh_s = lease_refresh_s
        self.abort_check_s = abort_check_s
        # Jobs see whether their cancellation is an abort (worker.taskkit.registry).
        self.ctx[ABORTING_KEY] = self.aborting_tasks
        self.ctx[JOB_SLOTS_KEY] = lambda: self.job_counter
        # ARQ's TTL at pickup (its only use): the first lease, renewed by renew_leases.
        self.in_progress_timeout_s = lease_s
        self._take_script: AsyncScript | None = None
        # Set whenever a job ends and frees its slot (start_jobs waits on it when full).
        self._slot_freed = asyncio.Event()
        self._view: _JobView | None = None

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
            except REDIS_ERRORS as error:
                # Redis is away: the poll loop fails on the same outage and the service
                # logs it once (worker.service).
                log.debug("worker.lease_renewal_failed", exc_info=error)

    async def check_aborts(self) -> list[str]:
        """Cancel the running jobs an abort was asked for (one round trip); return their ids.

        As ARQ's own check does, the job is marked in ``aborting_tasks`` first, so ARQ's
        run_job ends it as aborted (not re-queued), and its abort entry is removed.
        """
        job_ids = [job_id for job_id, task in self.job_tasks.items() if not task.done()]
        if not job_ids:
            return []
        # ZSCOREs in one round trip (not ZMSCORE: Redis 6.2+ only).
        async with self.pool.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.zscore(ABORT_KEY, job_id)
            scores = await pipe.execute()
        aborted = [job_id for job_id, score in zip(job_ids, scores, strict=True) if score]
        for job_id in aborted:
            task = self.job_tasks.get(job_id)
            if task is not None and not task.done():
                self.aborting_tasks.add(job_id)
                task.cancel()
        if aborted:
            await self.pool.zrem(ABORT_KEY, *aborted)
        return aborted

    async def _cancel_aborted_jobs(self) -> None:
        """ARQ's poll-loop check, replaced by ``check_aborts`` beside the loop.

        ARQ's reads the whole abort set on every poll (every 10 ms here) and is not
        reached while the worker is full; ours asks only about running jobs, 4 times a
        second, full or not.
        """

    async def _watch_aborts(self) -> None:
        while True:
            await asyncio.sleep(self.abort_check_s)
            try:
                await self.check_aborts()
            except REDIS_ERRORS as error:
                # As for leases: the service judges and logs a Redis outage.
                log.debug("worker.abort_check_failed", exc_info=error)

    async def main(self) -> None:
        """Run ARQ's poll loop with the lease renewer and the abort watcher beside it."""
        beside = [
            asyncio.create_task(self._keep_leases()),
            asyncio.create_task(self._watch_aborts()),
        ]
        try:
            await super().main()
        finally:
            for task in beside:
                task.cancel()
            for task in beside:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def run_job(self, job_id: str, score: int) -> None:
        """Run one job as ARQ does; a Redis error in ARQ's own bookkeeping ends it quietly.

        ARQ reads the job from Redis before it runs and writes its end after (finish_job);
        a job that ends while Redis is away fails that last step. ARQ keeps the error in
        the job's task and its poll loop re-raises it (``t.result()``) at a later poll,
        after Redis is back: one stale error per such job, each one taken for a new outage.
        Here the error stays with the job. The outcome is already in the database (the
        task wrote it); the job's keys in Redis go with its lease, which lapses within
        ``lease_s`` (a re-run finds the task final and skips it). Redis being away is
        judged and logged by the service, by a ping.
        """
        try:
            # ARQ's own run_job, its transactions batched with other jobs' (worker.pipelines).
            await Worker.run_job(cast(Worker, self._job_view()), job_id, score)
        except REDIS_ERRORS as error:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # Cancelled at a stop: ARQ's hand-back of the job to the queue failed.
                log.warning(
                    "worker.job_not_handed_back", extra=fields(task_id=job_id, error=repr(error))
                )
                return
            log.debug("worker.job_bookkeeping_failed", extra=fields(task_id=job_id), exc_info=error)

    def _job_view(self) -> _JobView:
        """The worker as run_job sees it, on a batching pool over the current pool."""
        view = self._view
        if view is None or view.pool.redis is not self.pool:
            view = self._view = _JobView(self, BatchingPool(self.pool))
        return view

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start the jobs of ``job_ids`` that no one runs yet, as many as there are free slots.

        ARQ's own start_jobs checks and takes each job's in-progress key in a WATCH / MULTI
        transaction: three round trips per job, one job after another, in the poll loop.
        Here one atomic script call (``_TAKE_LUA``, the same checks) takes a slot's worth
        of jobs at once. Jobs this worker already runs are skipped without asking Redis:
        each poll re-reads the head of the queue, where they sit.

        A slot is taken before the call and given back for each job not started, also when
        Redis fails mid-call (ARQ leaks the slot then). With every slot taken it waits for
        one, as ARQ does, but returns as soon as pickups are turned off (a graceful stop),
        so no job starts during the drain.
        """
        candidates = [
            job_id
            for job_id in (raw.decode() for raw in job_ids)
            if (running := self.tasks.get(job_id)) is None or running.done()
        ]
        while candidates:
            while self.job_counter >= self.max_jobs and self.allow_pick_jobs:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            if not self.allow_pick_jobs:
                return
            free = self.max_jobs - self.job_counter
            batch, candidates = candidates[:free], candidates[free:]
            for _ in batch:
                # Never waits: ARQ's semaphore has max_jobs + 1 places, and these are free.
                await self.sem.acquire()
                self.job_counter += 1
            try:
                started = await self._take(batch)
            except BaseException:
                self._give_back(len(batch))
                raise
            self._give_back(len(batch) - len(started))
            for job_id, score in started:
                task = self.loop.create_task(self.run_job(job_id, score))
                task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
                self.tasks[job_id] = task

    def _release_sem_dec_counter_on_complete(self) -> None:
        super()._release_sem_dec_counter_on_complete()
        self._slot_freed.set()

    def _give_back(self, slots: int) -> None:
        for _ in range(slots):
            self.job_counter -= 1
            self.sem.release()

    async def _take(self, job_ids: list[str]) -> list[tuple[str, int]]:
        """Take the in-progress key of each due job nobody runs; return them with scores."""
        if self._take_script is None or self._take_script.registered_client is not self.pool:
            self._take_script = self.pool.register_script(_TAKE_LUA)
        reply = await self._take_script(
            keys=[self.queue_name, *(in_progress_key_prefix + job_id for job_id in job_ids)],
            args=[timestamp_ms(), int(self.in_progress_timeout_s * 1000), *job_ids],
        )
        pairs = iter(reply)
        return [(raw.decode(), int(float(score))) for raw, score in zip(pairs, pairs, strict=True)]


class _JobView:
    """The worker as ARQ's ``run_job`` sees it: the worker's every attribute, read and
    written through, but its ``pool`` batches each turn's job transactions into one
    (worker.pipelines), for ``run_job`` and the ``finish_job`` it calls alike."""

    # ARQ's own, bound to the view so that they use its pool.
    finish_job = Worker.finish_job
    finish_failed_job = Worker.finish_failed_job

    def __init__(self, worker: LeasedWorker, pool: BatchingPool) -> None:
        object.__setattr__(self, "_worker", worker)
        object.__setattr__(self, "pool", pool)

    pool: BatchingPool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._worker, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # run_job counts jobs (self.jobs_complete += 1): the worker's counters.
        setattr(self._worker, name, value)


# KEYS: the queue, then the in-progress key of each job; ARGV: now (ms), the lease (ms),
# then each job id. A job starts when no worker holds its in-progress key and it is still
# in the queue and due: ARQ's own conditions in start_jobs. Returns id, score, id, ...
_TAKE_LUA = """
local now = tonumber(ARGV[1])
local started = {}
for i = 3, #ARGV do
    local key = KEYS[i - 1]
    if redis.call('EXISTS', key) == 0 then
        local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
        if score and tonumber(score) <= now then
            redis.call('PSETEX', key, ARGV[2], '1')
            started[#started + 1] = ARGV[i]
            started[#started + 1] = score
        end
    end
end
return started
"""
