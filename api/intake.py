"""The API process's one writer of new tasks: concurrent submissions share a transaction.

A submit endpoint validates its request, hands the tasks to ``IntakeWriter.submit`` and
awaits the outcome. The writer group-commits (``throttler.group_commit``): every
submission waiting when it is free (up to ``max_batch_tasks`` tasks) goes into ONE
transaction through the store's intake (``throttler.store.intake``: on SQLite a thread of
its own, on PostgreSQL one statement on the event loop), and each submission's future is
resolved only after the commit, so a 202 is only ever sent for committed tasks.

A failed batch sets its error on every submission in it: nothing of the batch is
committed, and each request answers as if its own transaction had failed (a 503 for a
database that cannot take the write). Except for ``KeyReusedError`` (a bulk request
reused an idempotency key for a different request): then each submission is written
again in a transaction of its own, so only the one at fault fails.

Each submission's outcome tells, per task, whether it was inserted or its idempotency
key is already bound to a task (``throttler.store.intake.Existing``). After each commit
the writer tells the announcer (if any), so that idle relays wake at once instead of at
their next poll.
"""

from __future__ import annotations

from collections.abc import Sequence

from api.announce import NewWorkAnnouncer
from throttler.group_commit import GroupCommitter, Take
from throttler.store.intake import Intake, KeyReusedError, Outcome, Submission
from throttler.submit import NewTask

# Tasks per transaction: large enough to amortize BEGIN/COMMIT under any load, small
# enough that one batch's statements stay well within driver and SQLite limits.
DEFAULT_MAX_BATCH_TASKS = 500


class IntakeClosedError(RuntimeError):
    """The writer has stopped (the API is shutting down); the submission was not written."""


class IntakeWriter:
    """Group-commits submissions through ``intake``; the app lifespan starts and closes it."""

    def __init__(
        self,
        intake: Intake,
        *,
        announcer: NewWorkAnnouncer | None = None,
        max_batch_tasks: int = DEFAULT_MAX_BATCH_TASKS,
    ) -> None:
        self._intake = intake
        self._announcer = announcer
        self._committer: GroupCommitter[Submission, Outcome] = GroupCommitter(
            self._insert,
            name="intake",
            max_batch=max_batch_tasks,
            size=lambda submission: len(submission.tasks),
            max_in_flight=intake.batches_in_flight,
            # Only a key reused by one request is its fault alone; anything else fails all.
            split_failed=lambda error: isinstance(error, KeyReusedError),
            after_commit=self._committed,
            closed_error=IntakeClosedError,
        )

    def start(self) -> None:
        """Start writing; call on the running loop."""
        self._committer.start()

    async def submit(self, tasks: Sequence[NewTask]) -> Outcome:
        """Write ``tasks`` atomically (never split across transactions); return once committed
        what became of each (None: inserted; else the task its idempotency key is bound to).

        Raises the batch's database error when the transaction fails, ``KeyReusedError``
        when a bulk request reused a key for a different request (nothing of it written).
        A caller cancelled before its batch is written (its client went away) is not
        written at all.
        """
        if not self._committer.open:
            raise IntakeClosedError("intake is closed")
        # Converted here, as the request arrives: the batch's transaction only executes.
        return await self._committer.submit(self._intake.prepare(tasks))

    async def close(self) -> None:
        """Refuse new submissions, write every one already queued, then stop."""
        try:
            await self._committer.close()
        finally:
            await self._intake.close()

    async def _insert(self, take: Take[Submission]) -> list[Outcome]:
        return await self._intake.insert(take)

    def _committed(self, _batch: Sequence[Submission], _results: Sequence[Outcome]) -> None:
        if self._announcer is not None:
            self._announcer.committed()
