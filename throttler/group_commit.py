"""Group commit: concurrent writers share one transaction, each still waits for its commit.

A caller hands a write to ``GroupCommitter.submit`` and awaits its result. One task takes
every write waiting when it is free (up to ``max_batch`` by ``size``) and hands the batch
to ``commit`` (ONE transaction, committed when it returns: where it runs, on the event
loop or on a thread of the store's own, is the store's business) as ``take``, a function
``commit`` calls once, as its transaction begins, for the batch's writes; the committer
resolves each write's future only after ``commit`` returns. Writes that arrive during a
commit form the next batch: an idle committer adds no delay, a busy one shares each
BEGIN/COMMIT among many writers. With ``linger_s``, a committer whose last batch held
more than one write waits that long for the writes about to arrive before it commits
(fewer, larger transactions under load). With
``max_in_flight`` above 1, the next batch is handed to ``commit`` while the last one is
still running, and writes arriving meanwhile join it until ``commit`` takes it: for a
store that runs its transactions one after another on a thread of its own (SQLite), the
thread goes straight on to the next batch, with every write waiting by then, instead of
waiting for the event loop to come round (which, with the loop busy serving requests and
an fsync per commit, cost up to half the API's submissions per second).

A failed batch: on a transient error (the database away, a lock timeout) every write in
it fails with that error and nothing of it is committed; on any other error, if
``split_failed`` says so (always, or for the errors its predicate accepts), each write is
tried again in a transaction of its own, so only the write at fault fails; otherwise
every write fails with it.

Cancellation: a write whose caller is cancelled while it is still queued is withdrawn
(never written), unless it was submitted with ``withdrawable=False``: then the caller
waits for its transaction to end before the cancellation goes on. A write already in a
transaction is committed or fails with the rest. ``close`` refuses new writes, commits
every one already queued, then stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from throttler.errors import is_transient_db_error
from throttler.logs import fields

log = logging.getLogger(__name__)

W = TypeVar("W")
R = TypeVar("R")

# What ``commit`` is handed: call it once, as the transaction begins, for the writes.
Take = Callable[[], Sequence[W]]

# Writes (by ``size``) per transaction unless the owner says otherwise.
DEFAULT_MAX_BATCH = 500


class CommitterClosedError(RuntimeError):
    """The committer has stopped (its process is shutting down); the write was not made."""


@dataclass(frozen=True, kw_only=True, slots=True)
class _Queued(Generic[W, R]):
    write: W
    done: asyncio.Future[R]


@dataclass(kw_only=True, slots=True)
class _Batch(Generic[W, R]):
    queued: list[_Queued[W, R]] = field(default_factory=list)
    size: int = 0
    keys: set[Hashable] = field(default_factory=set)
    # Set once ``commit`` has taken the batch (or it failed first): no write joins after.
    live: list[_Queued[W, R]] | None = None
    # ``take`` may run on the store's own thread while writes join on the loop.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seal(self) -> list[_Queued[W, R]]:
        """The writes to commit: those not withdrawn by now; none may join after."""
        with self.lock:
            if self.live is None:
                self.live = [queued for queued in self.queued if not queued.done.cancelled()]
            return self.live


class GroupCommitter(Generic[W, R]):
    """One writer that turns concurrent writes into shared transactions.

    ``commit`` writes a batch in one transaction and returns one result per write that
    ``take`` gave it, in order. ``size`` weighs a write against ``max_batch`` (a first
    write always fits); writes with the same ``key`` never share a batch, so they commit
    in the order given.
    With ``max_in_flight`` above 1, ``commit`` must run the batches it is handed in that
    order, one after another (a single thread does), for ``key`` to keep its promise.
    ``after_commit`` runs once a committed batch's futures are resolved (announcements).
    ``closed_error`` makes the error a refused or abandoned write raises.
    ``writers``, when given, says how many writes can be waiting at most (each writer
    waits for its own commit before it writes again): a batch that holds that many has
    everything that could come, and commits without lingering.
    """

    def __init__(
        self,
        commit: Callable[[Take[W]], Awaitable[Sequence[R]]],
        *,
        name: str,
        max_batch: int = DEFAULT_MAX_BATCH,
        size: Callable[[W], int] | None = None,
        key: Callable[[W], Hashable] | None = None,
        linger_s: float = 0.0,
        max_in_flight: int = 1,
        split_failed: bool | Callable[[Exception], bool] = False,
        failure_log_level: int = logging.WARNING,
        after_commit: Callable[[Sequence[W], Sequence[R]], None] | None = None,
        closed_error: Callable[[str], Exception] = CommitterClosedError,
        writers: Callable[[], int] | None = None,
    ) -> None:
        self._commit = commit
        self._name = name
        self._max_batch = max_batch
        self._size = size
        self._key = key
        self._linger_s = linger_s
        self._max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()
        # The batch handed over but not taken yet, which new writes may join.
        self._open: _Batch[W, R] | None = None
        self._split_failed = split_failed
        self._failure_log_level = failure_log_level
        self._after_commit = after_commit
        self._closed_error = closed_error
        self._writers = writers
        # A plain deque and one waiter, not an asyncio.Queue: the queue is on every
        # write's path, on the event loop, and its bookkeeping measured in the API's
        # submissions per second.
        self._queue: deque[_Queued[W, R] | None] = deque()
        self._arrived: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        # The last batch held more than one write: writes arrive faster than commits.
        self._busy = False

    def start(self) -> None:
        """Start committing; call on the running loop."""
        self._runner = asyncio.create_task(self._run(), name=self._name)

    @property
    def open(self) -> bool:
        return not self._closed and self._runner is not None

    async def submit(self, write: W, *, withdrawable: bool = True) -> R:
        """Queue ``write``; return its result once its batch is committed.

        Raises the batch's error if its transaction failed (nothing of it was written).
        """
        if not self.open:
            raise self._closed_error(f"{self._name} is closed")
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._put(_Queued(write=write, done=done))
        if withdrawable:
            # Cancelling the caller cancels the future: the write is left out of its batch.
            return await done
        try:
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await done
            raise

    async def close(self) -> None:
        """Refuse new writes, commit every one already queued, then stop."""
        if self._closed:
            return
        self._closed = True
        self._put(None)
        if self._runner is not None:
            await self._runner

    def _put(self, queued: _Queued[W, R] | None) -> None:
        joining = self._open
        if queued is not None and joining is not None and not self._queue:
            with joining.lock:
                if joining.live is None and self._fits(joining, queued):
                    self._add(joining, queued)
                    return
        self._queue.append(queued)
        if self._arrived is not None and not self._arrived.done():
            self._arrived.set_result(None)

    async def _next(self) -> _Queued[W, R] | None:
        """The first queued write (or the stop marker), waiting for one if need be."""
        while not self._queue:
            self._arrived = asyncio.get_running_loop().create_future()
            try:
                await self._arrived
            finally:
                self._arrived = None
        return self._queue.popleft()

    async def _run(self) -> None:
        try:
            await self._commit_batches()
        finally:
            if self._in_flight:
                await asyncio.gather(*self._in_flight, return_exceptions=True)
        # Nothing is queued after the stop marker (closed is set first), but never leave
        # a caller waiting for ever.
        while self._queue:
            leftover = self._queue.popleft()
            if leftover is not None and not leftover.done.done():
                leftover.done.set_exception(self._closed_error(f"{self._name} is closed"))

    async def _commit_batches(self) -> None:
        held: _Queued[W, R] | None = None
        stopping = False
        while not stopping:
            # A free slot first, then the batch: it takes every write waiting by then.
            await self._slots.acquire()
            first = held if held is not None else await self._next()
            held = None
            if first is None:
                self._slots.release()
                break
            batch: _Batch[W, R] = _Batch()
            self._add(batch, first)
            held, stopping = self._take_waiting(batch)
            if self._busy and held is None and not stopping and self._may_grow(batch):
                # Under load, wait a moment for the writes about to arrive: each batch
                # costs a commit and a hop to the database whatever its size.
                await asyncio.sleep(self._linger_s)
                held, stopping = self._take_waiting(batch)
            self._busy = len(batch.queued) > 1
            await self._launch(batch)
        self._open = None
        if held is not None:
            await self._slots.acquire()
            await self._launch(self._batch_of([held]))

    def _may_grow(self, batch: _Batch[W, R]) -> bool:
        """Whether lingering could bring ``batch`` more writes."""
        if self._linger_s <= 0:
            return False
        return self._writers is None or len(batch.queued) < self._writers()

    def _batch_of(self, writes: Sequence[_Queued[W, R]]) -> _Batch[W, R]:
        batch: _Batch[W, R] = _Batch()
        for queued in writes:
            self._add(batch, queued)
        return batch

    async def _launch(self, batch: _Batch[W, R]) -> None:
        """Write ``batch``: here and now with one slot, else beside the batch in flight."""
        if self._max_in_flight == 1:
            try:
                await self._write(batch)
            finally:
                self._slots.release()
            return
        self._open = batch
        task = asyncio.create_task(self._write(batch))
        self._in_flight.add(task)
        task.add_done_callback(self._landed)

    def _landed(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()

    def _add(self, batch: _Batch[W, R], queued: _Queued[W, R]) -> None:
        batch.queued.append(queued)
        batch.size += 1 if self._size is None else self._size(queued.write)
        if self._key is not None:
            batch.keys.add(self._key(queued.write))

    def _fits(self, batch: _Batch[W, R], queued: _Queued[W, R]) -> bool:
        if self._key is not None and self._key(queued.write) in batch.keys:
            return False
        weight = 1 if self._size is None else self._size(queued.write)
        return batch.size + weight <= self._max_batch

    def _take_waiting(self, batch: _Batch[W, R]) -> tuple[_Queued[W, R] | None, bool]:
        """Add what is already queued (no waiting) to ``batch``; return a write that opens
        the next batch, and whether the stop marker came."""
        while self._queue:
            following = self._queue.popleft()
            if following is None:
                return None, True  # commit what came before the stop, then end
            if not self._fits(batch, following):
                return following, False
            self._add(batch, following)
        return None, False

    async def _write(self, batch: _Batch[W, R]) -> None:
        # A write withdrawn (its caller cancelled) before its turn is not written at all.
        if self._max_in_flight == 1 and not batch.seal():
            return

        def take() -> list[W]:
            return [queued.write for queued in batch.seal()]

        try:
            results = await self._commit(take)
        except Exception as error:
            await self._failed(batch.seal(), error)
            return
        except BaseException as error:
            # Cancelled mid-transaction: whether it committed is unknown, so no write may
            # report success.
            for queued in batch.seal():
                _fail(queued, self._closed_error(str(error) or "cancelled"))
            raise
        live = batch.seal()
        for queued, result in zip(live, results, strict=True):
            if not queued.done.done():
                queued.done.set_result(result)
        if self._after_commit is not None:
            self._after_commit([queued.write for queued in live], results)

    async def _failed(self, live: Sequence[_Queued[W, R]], error: Exception) -> None:
        if not live:
            return
        split = self._split_failed
        if callable(split):
            split = split(error)
        if is_transient_db_error(error) or not split or len(live) == 1:
            # Each caller decides whether to try again (the outage is logged there).
            log.log(
                self._failure_log_level,
                f"{self._name}.batch_failed",
                extra=fields(writes=len(live), error=repr(error)[:300]),
            )
            for queued in live:
                _fail(queued, error)
            return
        # Not an outage: one write is at fault. Write each alone, so it fails by itself.
        log.warning(
            f"{self._name}.batch_split", extra=fields(writes=len(live), error=repr(error)[:300])
        )
        for queued in live:
            await self._write(self._batch_of([queued]))


def _fail(queued: _Queued[W, R], error: BaseException) -> None:
    if not queued.done.done():
        queued.done.set_exception(error)
