"""Group commit for the worker: concurrent jobs' status writes share one transaction.

Each job hands its start (``start``) and its outcome (``finish``) to the process's one
``StatusWriter`` and awaits that write's commit: a start is recorded before the task code
runs, an outcome before the job returns to ARQ. The writer group-commits
(``throttler.group_commit``) through the store's attempts (``throttler.store.attempts``:
a few statements per batch whatever its size; on SQLite a thread of its own). An idle
worker adds no delay; a busy one (its last batch held more than one write) waits
``linger_s`` for the jobs about to hand over theirs, so each BEGIN/COMMIT (an fsync on
SQLite) is shared by many jobs. One writer also means the worker's own jobs never queue
on SQLite's write lock. A start and an outcome of the same task never share a batch, so
they are written in the order handed over.

A batch that fails because of the database's state (down, locked, read-only, disk full,
privileges revoked: ``throttler.errors.is_transient_db_error``) fails every write in it;
nothing of it is committed, and each caller retries its own write (see
worker.taskkit.persist: an outcome's whatever the error), so the next batches carry them.
A batch that fails on any other error is written again one write per transaction, so
only the write that caused it fails.

Once committed, the ids of tasks made terminal are announced on Redis (throttler.finished)
by one publisher task, a pipeline per round with every id waiting: off the writer's path,
best effort, never awaited by a job.

A job cancelled while its write is queued withdraws a start (nothing ran) but not an
outcome (``finish``); a write already in a transaction is committed or fails as a whole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from throttler.finished import announce_outage, publish_finished
from throttler.group_commit import GroupCommitter, Take
from throttler.job_ids import Dispatch
from throttler.models import utcnow
from throttler.store.attempts import Attempt, Attempts, Outcome

log = logging.getLogger(__name__)

# Writes per transaction: a batch never needs more than the worker's job slots times two
# (a start and an outcome each), and this keeps every statement well within limits.
DEFAULT_MAX_BATCH = 500
# How long a busy writer waits for more writes before it commits: it trades that much
# latency per write for fewer, larger transactions.
DEFAULT_LINGER_S = 0.005


class StatusWriterClosed(RuntimeError):
    """The writer has stopped (the worker is shutting down); the write was not made."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Start:
    dispatch: Dispatch

    @property
    def task_id(self) -> str:
        return self.dispatch.task_id


@dataclass(frozen=True, kw_only=True, slots=True)
class _Finish:
    outcome: Outcome
    announce: Redis | None

    @property
    def task_id(self) -> str:
        return self.outcome.task_id


_Write = _Start | _Finish
# A start's attempt (None if the task is already final), or whether an outcome was written.
_Result = Attempt | bool | None


class StatusWriter:
    """The worker process's single writer of task starts and outcomes."""

    def __init__(
        self,
        attempts: Attempts,
        *,
        worker_id: str,
        max_batch: int = DEFAULT_MAX_BATCH,
        linger_s: float = DEFAULT_LINGER_S,
        running_jobs: Callable[[], int] | None = None,
    ) -> None:
        self._attempts = attempts
        self._worker_id = worker_id
        self._committer: GroupCommitter[_Write, _Result] = GroupCommitter(
            self._commit,
            name="status_writer",
            max_batch=max_batch,
            # One write per task per transaction: two for the same task keep their order.
            key=lambda write: write.task_id,
            linger_s=linger_s,
            split_failed=True,
            # Every caller retries its own write; the outage is logged there, once.
            failure_log_level=logging.DEBUG,
            after_commit=self._committed,
            closed_error=StatusWriterClosed,
            # A job waits for its write's commit before it writes again: a batch with a
            # write of every running job commits at once. The worker's jobs start (and,
            # quick ones, end) together, so a linger would only add to each of them.
            writers=running_jobs,
        )
        self._to_announce: dict[int, tuple[Redis, list[str]]] = {}
        self._announcer: asyncio.Task[None] | None = None
        self._announce_outage = announce_outage()

    def start_writing(self) -> None:
        """Start the writer task on the running loop."""
        self._committer.start()

    async def close(self) -> None:
        """Refuse new writes, write every one already queued, then stop."""
        try:
            await self._committer.close()
            if self._announcer is not None:
                await self._announcer
        finally:
            await self._attempts.close()

    async def start(self, *, task_id: str, dispatch: Dispatch | None = None) -> Attempt | None:
        """Record the start of an attempt; return it, or None if the task is not ``queued``
        on ``dispatch`` (final, back in the outbox, or a stale job; None: any dispatch).

        Raises the batch's database error if the transaction failed (nothing was written).
        """
        if dispatch is None:
            dispatch = Dispatch(task_id=task_id)
        if dispatch.task_id != task_id:
            raise ValueError(f"dispatch {dispatch.job_id!r} is not of task {task_id!r}")
        result = await self._committer.submit(_Start(dispatch=dispatch))
        assert result is None or isinstance(result, Attempt)
        return result

    async def finish(self, outcome: Outcome, *, announce: Redis | None = None) -> bool:
        """Record an outcome; return False if the task was already final. One try.

        With ``announce``, a terminal outcome is published there once committed. A caller
        cancelled meanwhile (the worker is stopping) does not withdraw the write: its
        transaction ends first, then CancelledError propagates, so ARQ re-queues the job
        only once the outcome is committed or known to have failed.
        """
        result = await self._committer.submit(
            _Finish(outcome=outcome, announce=announce), withdrawable=False
        )
        return bool(result)

    async def _commit(self, take: Take[_Write]) -> list[_Result]:
        writes = take()
        written = await self._attempts.write(
            starts=[write.dispatch for write in writes if isinstance(write, _Start)],
            outcomes=[write.outcome for write in writes if isinstance(write, _Finish)],
            worker_id=self._worker_id,
            now=utcnow(),
        )
        return [
            written.started.get(write.task_id)
            if isinstance(write, _Start)
            else write.task_id in written.recorded
            for write in writes
        ]

    def _committed(self, writes: Sequence[_Write], results: Sequence[_Result]) -> None:
        for write, result in zip(writes, results, strict=True):
            if (
                isinstance(write, _Finish)
                and result is True
                and write.outcome.terminal
                and write.announce is not None
            ):
                self._announce(write.announce, write.task_id)

    def _announce(self, redis: Redis, task_id: str) -> None:
        """Queue an id for publishing; one publisher at a time takes all that are waiting."""
        self._to_announce.setdefault(id(redis), (redis, []))[1].append(task_id)
        if self._announcer is None or self._announcer.done():
            self._announcer = asyncio.create_task(self._publish_waiting())

    async def _publish_waiting(self) -> None:
        # A pipeline per round, not per batch: under load ids pile up while one is sent.
        while self._to_announce:
            rounds, self._to_announce = self._to_announce, {}
            for redis, task_ids in rounds.values():
                await publish_finished(redis, task_ids=task_ids, outage=self._announce_outage)
