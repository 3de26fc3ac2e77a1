"""Interrupt running ARQ jobs: ARQ's own abort protocol, pruned, checked beside the poll loop.

ARQ's protocol (arq 0.28, ``Job.abort``): the job id goes into the sorted set
``arq:abort`` (score: when, in ms); a worker that runs the job cancels it and records it
as aborted (``arq.worker.Worker.run_job``: the job ends, it is not run again). Two of
ARQ's own parts do not serve us, so:

- ARQ looks at the set only in its poll loop, which waits while every job slot is taken
  (``worker.leases.LeasedWorker.start_jobs``): a full worker would never see an abort.
  ``worker.leases`` checks it beside the loop, every ``ABORT_CHECK_S``, for the jobs the
  worker runs.
- ARQ prunes the set with ``ZREMRANGEBYSCORE min=now+60s``: nothing is ever pruned, so
  an abort for a job that had already ended stays for good. ``request_aborts`` removes
  entries older than ``ABORT_KEEP_S`` whenever it adds some.

Best effort: the database decides. A cancelled task's late outcome is discarded
(throttler.store.attempts), so an abort that never arrives (Redis away) only lets the
attempt run on to its end, holding a worker slot (not an in-flight slot) meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from arq.constants import abort_jobs_ss
from redis.asyncio import Redis

from throttler.errors import REDIS_ERRORS
from throttler.logs import fields

log = logging.getLogger(__name__)

# ARQ's key, so that ARQ's own bookkeeping (it removes a finished job's entry) applies.
ABORT_KEY = abort_jobs_ss
# How long an abort waits for its job: a worker sees it within ABORT_CHECK_S, unless its
# event loop is blocked that long, and then the outcome is discarded anyway.
ABORT_KEEP_S = 60.0
# How often a worker looks for aborts of the jobs it runs: a non-blocking task is
# interrupted within this (plus a Redis round trip) of the cancel.
ABORT_CHECK_S = 0.25
# A dead Redis must not hold a cancel's answer for long: the cancel is committed already.
ABORT_TIMEOUT_S = 1.0


async def request_aborts(
    redis: Redis, job_ids: Sequence[str], *, timeout_s: float = ABORT_TIMEOUT_S
) -> bool:
    """Ask the workers running ``job_ids`` to interrupt them; call after the cancel commits.

    Returns False (and logs why) when Redis could not be told.
    """
    if not job_ids:
        return True
    now_ms = int(time.time() * 1000)
    try:
        async with asyncio.timeout(timeout_s), redis.pipeline(transaction=False) as pipe:
            pipe.zadd(ABORT_KEY, dict.fromkeys(job_ids, now_ms))
            pipe.zremrangebyscore(ABORT_KEY, "-inf", f"({now_ms - int(ABORT_KEEP_S * 1000)}")
            await pipe.execute()
    except REDIS_ERRORS as error:
        log.warning(
            "task.interrupt_not_sent",
            extra=fields(
                jobs=",".join(job_ids[:10]),
                count=len(job_ids),
                error=repr(error),
                note="cancelled in the database: the attempt runs on, its outcome discarded",
            ),
        )
        return False
    return True
