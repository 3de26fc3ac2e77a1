"""Group commit for the worker: concurrent jobs' status writes share one transaction.

Each job hands its start (``start``) and its outcome (``finish``) to the process's one
``StatusWriter`` and awaits that write's commit: a start is recorded before the task code
runs, an outcome before the job returns to ARQ. The writer takes every write waiting when
it is free (up to ``max_batch``), writes them with a few statements in ONE transaction
(see worker.taskkit.transactions), commits, and only then resolves each write's future.
Writes that arrive during a commit form the next batch. An idle worker adds no delay; a
busy one (its last batch held more than one write) waits ``linger_s`` for the jobs about
to hand over theirs, so each BEGIN/COMMIT (an fsync on SQLite) is shared by many jobs. One
writer also means the worker's own jobs never queue on SQLite's write lock.

A batch that fails on a transient error (database down, lock timeout) fails every write
in it; nothing of it is committed, and each caller retries its own write (see
worker.taskkit.persist), so the next batches carry them. A batch that fails on any other
error is written again one write per transaction, so only the write that caused it fails.

Once committed, the ids of tasks made terminal are announced on Redis (throttler.finished)
by one publisher task, a pipeline per round with every id waiting: off the writer's path,
best effort, never awaited by a job.

A job cancelled while its write is queued withdraws a start (nothing ran) but not an
outcome (``finish``); a write already in a transaction is committed or fails as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis

from throttler.errors import STATEMENT_ERRORS, TRANSIENT_DB_ERRORS
from throttler.finished import publish_finished
from throttler.lifecycle import Attempt, Outcome
from throttler.logs import fields
from throttler.models import utcnow
from worker.taskkit.transactions import Batches, BatchResult

log = logging.getLogger(__name__)

# Writes per transaction: a batch never needs more than the worker's job slots times two
# (a start and an outcome each), and this keeps every statement well within limits.
DEFAULT_MAX_BATCH = 500
# How long a busy writer waits for more writes before it commits: it trades that much
# latency per write for fewer, larger transactions (see _run).
DEFAULT_LINGER_S = 0.005


class StatusWriterClosed(RuntimeError):
    """The writer has stopped (the worker is shutting down); the write was not made."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Start:
    task_id: str
    done: asyncio.Future[Attempt | None]


@dataclass(frozen=True, kw_only=True, slots=True)
class _Finish:
    outcome: Outcome
    announce: Redis | None
    done: asyncio.Future[bool]

    @property
    def task_id(self) -> str:
        return self.outcome.task_id


_Write = _Start | _Finish


@dataclass(kw_only=True, slots=True)
class _Batch:
    writes: list[_Write] = field(default_factory=list)
    task_ids: set[str] = field(default_factory=set)

    def fits(self, write: _Write, *, max_batch: int) -> bool:
        # One write per task per transaction: two for the same task must keep their order.
        return len(self.writes) < max_batch and write.task_id not in self.task_ids

    def add(self, write: _Write) -> None:
        self.writes.append(write)
        self.task_ids.add(write.task_id)


class StatusWriter:
    """The worker process's single writer of task starts and outcomes."""

    def __init__(
        self,
        batches: Batches,
        *,
        worker_id: str,
        max_batch: int = DEFAULT_MAX_BATCH,
        linger_s: float = DEFAULT_LINGER_S,
    ) -> None:
        self._batches = batches
        self._linger_s = linger_s
        # The last batch held more than one write: jobs are arriving faster than commits.
        self._busy = False
        self._worker_id = worker_id
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Write | None] = asyncio.Queue()
        self._runner: asyncio.Task[None] | None = None
        self._to_announce: dict[int, tuple[Redis, list[str]]] = {}
        self._announcer: asyncio.Task[None] | None = None
        self._closed = False

    def start_writing(self) -> None:
        """Start the writer task on the running loop."""
        self._runner = asyncio.create_task(self._run(), name="status-writer")

    async def close(self) -> None:
        """Refuse new writes, write every one already queued, then stop."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        try:
            if self._runner is not None:
                await self._runner
            if self._announcer is not None:
                await self._announcer
        finally:
            await self._batches.close()

    async def start(self, *, task_id: str) -> Attempt | None:
        """Record the start of an attempt; return it, or None if the task is already final.

        Raises the batch's database error if the transaction failed (nothing was written).
        """
        self._check_open()
        done: asyncio.Future[Attempt | None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Start(task_id=task_id, done=done))
        return await done

    async def finish(self, outcome: Outcome, *, announce: Redis | None = None) -> bool:
        """Record an outcome; return False if the task was already final. One try.

        With ``announce``, a terminal outcome is published there once committed. A caller
        cancelled meanwhile (the worker is stopping) does not withdraw the write: its
        transaction ends first, then CancelledError propagates, so ARQ re-queues the job
        only once the outcome is committed or known to have failed.
        """
        self._check_open()
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Finish(outcome=outcome, announce=announce, done=done))
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await done
            raise

    def _check_open(self) -> None:
        if self._closed or self._runner is None:
            raise StatusWriterClosed("status writer is closed")

    async def _run(self) -> None:
        held: _Write | None = None
        stopping = False
        while not stopping:
            first = held if held is not None else await self._queue.get()
            held = None
            if first is None:
                break
            batch = _Batch()
            batch.add(first)
            held, stopping = self._take_waiting(batch)
            if self._busy and held is None and not stopping and self._linger_s > 0:
                # Under load, wait a moment for the jobs about to hand over their writes:
                # each batch costs a commit (an fsync), a hop to the database thread and
                # its statements, whatever its size. Idle, the writer never waits.
                await asyncio.sleep(self._linger_s)
                held, stopping = self._take_waiting(batch)
            self._busy = len(batch.writes) > 1
            await self._write(batch.writes)
        if held is not None:
            await self._write([held])
        # Nothing can be queued after the stop marker (closed is set first), but never
        # leave a caller waiting for ever.
        while not self._queue.empty():
            leftover = self._queue.get_nowait()
            if leftover is not None and not leftover.done.done():
                leftover.done.set_exception(StatusWriterClosed("status writer is closed"))

    def _take_waiting(self, batch: _Batch) -> tuple[_Write | None, bool]:
        """Add what is already queued to ``batch``; return a write left for the next batch,
        and whether the stop marker came."""
        while not self._queue.empty():
            following = self._queue.get_nowait()
            if following is None:
                return None, True  # write what came before the stop, then end
            if not batch.fits(following, max_batch=self._max_batch):
                return following, False  # it opens the next batch
            batch.add(following)
        return None, False

    async def _write(self, writes: Sequence[_Write]) -> None:
        # A job cancelled while its start waited is not started at all.
        live = [write for write in writes if not write.done.cancelled()]
        if not live:
            return
        try:
            started, finished = await self._transaction(live)
        except Exception as error:
            if _transient(error):
                # Every caller retries its own write; the outage is logged there, once.
                log.debug("status_writer.batch_failed", extra=fields(writes=len(live)))
                for write in live:
                    _fail(write, error)
                return
            if len(live) == 1:
                _fail(live[0], error)
                return
            # Not an outage: one write is at fault. Write each alone, so it fails by itself.
            log.warning(
                "status_writer.batch_split", extra=fields(writes=len(live), error=repr(error))
            )
            for write in live:
                await self._write([write])
            return
        except BaseException as error:
            # Cancelled mid-transaction: whether it committed is unknown.
            for write in live:
                _fail(write, StatusWriterClosed(str(error) or "cancelled"))
            raise
        self._resolve(live, started=started, finished=finished)

    async def _transaction(self, writes: Sequence[_Write]) -> BatchResult:
        return await self._batches.write(
            starts=[write.task_id for write in writes if isinstance(write, _Start)],
            outcomes=[write.outcome for write in writes if isinstance(write, _Finish)],
            worker_id=self._worker_id,
            now=utcnow(),
        )

    def _resolve(
        self, writes: Sequence[_Write], *, started: dict[str, Attempt], finished: set[str]
    ) -> None:
        announce: dict[int, tuple[Redis, list[str]]] = {}
        for write in writes:
            if isinstance(write, _Start):
                if not write.done.done():
                    write.done.set_result(started.get(write.task_id))
                continue
            written = write.task_id in finished
            if not write.done.done():
                write.done.set_result(written)
            if written and write.outcome.terminal and write.announce is not None:
                announce.setdefault(id(write.announce), (write.announce, []))[1].append(
                    write.task_id
                )
        for redis, task_ids in announce.values():
            self._announce(redis, task_ids)

    def _announce(self, redis: Redis, task_ids: list[str]) -> None:
        """Queue ids for publishing; one publisher at a time takes all that are waiting."""
        waiting = self._to_announce.setdefault(id(redis), (redis, []))[1]
        waiting.extend(task_ids)
        if self._announcer is None or self._announcer.done():
            self._announcer = asyncio.create_task(self._publish_waiting())

    async def _publish_waiting(self) -> None:
        # A pipeline per round, not per batch: under load ids pile up while one is sent.
        while self._to_announce:
            rounds, self._to_announce = self._to_announce, {}
            for redis, task_ids in rounds.values():
                await publish_finished(redis, task_ids=task_ids)


def _transient(error: Exception) -> bool:
    return isinstance(error, TRANSIENT_DB_ERRORS) and not isinstance(error, STATEMENT_ERRORS)


def _fail(write: _Write, error: BaseException) -> None:
    if not write.done.done():
        write.done.set_exception(error)
