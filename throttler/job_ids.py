"""ARQ job ids: one per dispatch of a task (one trip through the outbox), not one per task.

Every attempt goes back through the outbox and the relay (SPEC, Statuses), so one task is
handed to ARQ several times. ARQ refuses a job id while ``arq:job:ID`` or
``arq:result:ID`` exists, and keeps the result key ``keep_result`` seconds after the job
ends (an hour by default): with the task id as the job id, a retry's enqueue would be
skipped as "already held" and the task would stay ``queued``. Keeping ARQ's dedup is
what makes a relay that enqueued and then crashed before releasing its rows harmless:
its successor enqueues the same job id again, a no-op.

So the job id names the dispatch: the task id and the moment the relay released it
(``tasks.queued_at``, in microseconds since the epoch). The moment is written in the claim
transaction that marks the task ``queued`` and is left alone by a repeat claim of the same
row after a relay crash, so the id is stable across that crash; every trip through the
outbox gets a new release moment, so the next dispatch has a new id. It also tells a stale
job apart: a worker starts a task only while it is ``queued`` with this very moment
(``throttler.store.attempts``), so an earlier dispatch still in ARQ (a recovery requeued
the task, a worker shutdown put it back) can never start a second attempt.

No new column: the release moment is already the task's, and the ``queued`` event's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

# Between the task id and the release moment; task ids never contain it (uuid4 text).
SEPARATOR = "@"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def moment_us(at: datetime) -> int:
    """``at`` as whole microseconds since the epoch: exact, as the databases store it."""
    return (at - _EPOCH) // _MICROSECOND


def released_job_id(task_id: str, released_us: int) -> str:
    """The job id of the dispatch of ``task_id`` released at ``released_us`` (``moment_us``).

    ``Dispatch.of(task_id, queued_at=at).job_id`` without the Dispatch: a relay names a
    thousand jobs a claim, most released at the same moment.
    """
    return f"{task_id}{SEPARATOR}{released_us}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Dispatch:
    """One dispatch of a task: which task, released at which moment."""

    task_id: str
    # tasks.queued_at of the dispatch in microseconds. None: any dispatch, for callers that
    # start a task directly (tools, tests); a job id without one names no dispatch, and
    # its job starts nothing (worker.taskkit.registry).
    released_us: int | None = None

    @classmethod
    def of(cls, task_id: str, *, queued_at: datetime | None) -> Dispatch:
        return cls(task_id=task_id, released_us=None if queued_at is None else moment_us(queued_at))

    @classmethod
    def parse(cls, job_id: str) -> Dispatch:
        """The dispatch an ARQ job id names (see ``job_id``)."""
        task_id, separator, released = job_id.rpartition(SEPARATOR)
        if not separator or not task_id or not released.isdigit():
            return cls(task_id=job_id)
        return cls(task_id=task_id, released_us=int(released))

    @property
    def job_id(self) -> str:
        if self.released_us is None:
            return self.task_id
        return released_job_id(self.task_id, self.released_us)

    @property
    def named(self) -> bool:
        """Whether this names one dispatch (a job id from the relay always does)."""
        return self.released_us is not None

    def is_current(self, queued_at: datetime | None) -> bool:
        """Whether a task released at ``queued_at`` is still on this dispatch (any: yes)."""
        if self.released_us is None:
            return True
        return queued_at is not None and moment_us(queued_at) == self.released_us
