"""ARQ's per-job Redis transactions, sent together: one MULTI/EXEC for the jobs of a moment.

ARQ's ``run_job`` opens each job with a transaction (read the job, count the try) and
``finish_job`` ends it with another (store the result, leave the queue, drop its keys):
two round trips per job, each a pipeline built, sent and parsed on the event loop. A
worker's jobs start in batches (one pickup takes a slot's worth, ``worker.leases``) and
end in batches (one status-writer commit releases every job in it,
``worker.taskkit.status_writer``), so those transactions come in bursts within one turn
of the event loop. Here they run as ARQ's own code wrote them, against a pool whose
``pipeline(transaction=True)`` hands out a share of one transaction per turn: each job
queues its commands as usual, awaits ``execute``, and gets its own replies, once every
job that opened a transaction in the same turn has queued its commands and the whole
batch has been sent as one MULTI/EXEC.

Each job's commands stay together and in order, and still run atomically (a larger
transaction holds them). A command that fails fails only its own job, with its error; a
batch that cannot be sent (Redis away) fails each of its jobs with the error, as each
job's own transaction would have failed.
tests/contract/test_arq_private_api.py checks that ARQ still queues a transaction's
commands with no await before its one ``execute`` (else a share could not be cut out of
the batch); test_arq_pickup.py runs ARQ's jobs through this and through ARQ's own worker.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio.client import Pipeline


class _Batch:
    """One turn's shared transaction, and its replies once sent."""

    __slots__ = ("pipe", "replies")

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.replies: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()


class _Share:
    """One job's transaction within a batch: its commands go to the batch's pipeline."""

    __slots__ = ("_batch", "_first")

    def __init__(self, batch: _Batch) -> None:
        self._batch = batch
        self._first = len(batch.pipe)

    async def __aenter__(self) -> _Share:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        # A command (get, incr, set, zrem...): queued on the batch's pipeline, which the
        # command returns; ARQ ignores that return value.
        return getattr(self._batch.pipe, name)

    async def execute(self) -> list[Any]:
        """This job's replies, once the batch holding its commands is sent."""
        last = len(self._batch.pipe)
        replies = (await asyncio.shield(self._batch.replies))[self._first : last]
        for reply in replies:
            # A command of this job failed (the batch was sent without raising): the job
            # fails as its own transaction would have, the others carry on.
            if isinstance(reply, Exception):
                raise reply
        return replies


class BatchingPool:
    """``redis`` for ARQ's job transactions: ``pipeline(transaction=True)`` gives a share
    of the turn's one transaction; anything else is ``redis``'s own."""

    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis
        self._open: _Batch | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.redis, name)

    def pipeline(self, transaction: bool = True) -> Any:
        if not transaction:
            return self.redis.pipeline(transaction=False)
        batch = self._open
        if batch is None:
            batch = self._open = _Batch(self.redis.pipeline(transaction=True))
            # After the callbacks ready now: every job resumed in this turn joins first.
            asyncio.get_running_loop().call_soon(self._close, batch)
        return _Share(batch)

    def _close(self, batch: _Batch) -> None:
        if self._open is batch:
            self._open = None
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    @staticmethod
    async def _send(batch: _Batch) -> None:
        try:
            replies = await batch.pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            batch.replies.cancel()
            raise
        except Exception as error:
            batch.replies.set_exception(error)
            # Marked as seen: every job awaiting it raises it; none left is no one to tell.
            batch.replies.exception()
        else:
            batch.replies.set_result(replies)
        finally:
            await batch.pipe.reset()  # type: ignore[no-untyped-call]
