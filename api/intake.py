"""Group commit: one writer per API process turns concurrent submissions into one transaction.

A submit endpoint validates its request, hands the rows to ``IntakeWriter.submit`` and
awaits the outcome. The writer takes every submission waiting at that moment (up to
``max_batch_tasks`` rows), inserts them all in ONE transaction, commits, and only then
resolves each submission's future. Requests that arrive while a commit runs queue up and
form the next batch, so an idle server adds no latency and a busy one shares each
BEGIN/COMMIT (and its fsync) among many requests.

A failed batch sets its error on every submission in it: nothing of the batch is
committed, and each request answers as if its own transaction had failed (a 503 for a
database that cannot take the write). A 202 is only ever sent after the commit.

After each commit, once its submissions are answered, the writer tells the announcer (if
any), so that idle relays wake at once instead of at their next poll.

Two writers: ``api.intake_sqlite`` (its own thread and connection) for SQLite, and
``api.intake_session`` (SQLAlchemy sessions on the event loop) for PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from api.announce import NewWorkAnnouncer
from throttler.logs import fields
from throttler.submit import NewTask

log = logging.getLogger(__name__)

# Rows per transaction: large enough to amortize BEGIN/COMMIT under any load, small
# enough that one batch's statements stay well within driver and SQLite limits.
DEFAULT_MAX_BATCH_TASKS = 500


class IntakeClosedError(RuntimeError):
    """The writer has stopped (the API is shutting down); the submission was not written."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Submission:
    """One request's tasks (written together or not at all) and the future it awaits."""

    tasks: Sequence[NewTask]
    done: asyncio.Future[None]


class IntakeWriter(ABC):
    """The API process's single writer of new tasks; the app lifespan starts and closes it."""

    def __init__(
        self,
        *,
        announcer: NewWorkAnnouncer | None = None,
        max_batch_tasks: int = DEFAULT_MAX_BATCH_TASKS,
    ) -> None:
        self._announcer = announcer
        self._max_batch_tasks = max_batch_tasks

    @abstractmethod
    def start(self) -> None:
        """Start writing; call on the running loop."""

    @abstractmethod
    async def submit(self, tasks: Sequence[NewTask]) -> None:
        """Write ``tasks`` atomically (never split across transactions); return once committed.

        Raises the batch's database error when the transaction fails.
        """

    @abstractmethod
    async def close(self) -> None:
        """Refuse new submissions, write every one already queued, then stop."""

    def _settle(self, batch: Sequence[Submission], error: BaseException | None) -> None:
        """Answer every submission of a batch just written (or not): call on the loop."""
        if error is not None:
            log.warning(
                "intake.batch_failed",
                extra=fields(
                    requests=len(batch),
                    tasks=sum(len(submission.tasks) for submission in batch),
                    error=repr(error)[:300],
                ),
            )
        for submission in batch:
            if submission.done.done():
                continue  # its client went away meanwhile
            if error is None:
                submission.done.set_result(None)
            else:
                submission.done.set_exception(error)
        if error is None and self._announcer is not None:
            self._announcer.committed()
