"""Hand a whole batch of jobs to ARQ in one Redis call, exactly as ``enqueue_job`` would.

``ArqRedis.enqueue_job`` costs a WATCH, an EXISTS and a MULTI/EXEC round trip per job.
One Lua script per batch does the same per job, atomically: skip it while
``arq:job:ID`` or ``arq:result:ID`` exists (ARQ's dedup, so a repeat after a crash is a
no-op), else ``PSETEX`` the job serialized by ``arq.jobs.serialize_job`` with ARQ's
expiry and ``ZADD`` it to the queue with its run time in ms as the score.

A job placed ``on_time`` (with a ``run_at``) must become runnable no earlier than that:
the script reads Redis ``TIME`` once, after its adds, when the batch is about to become
visible to ARQ, and takes back (``DEL`` + ``ZREM``, unseen by anyone) each such job
whose score is already past: ARQ would run it at once, bunched with its neighbours,
instead of at its moment. The caller learns it is ``LATE`` and gives it a new moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum

from arq.connections import ArqRedis
from arq.constants import job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms, to_unix_ms

# KEYS: the queue, then per job its job key and its result key.
# ARGV: the count P of distinct serialized jobs, those P payloads, then per job:
# job id, score (ms), expiry (ms), payload index (1-based), on time ("1": added only if
# its score is not past by the script's end; "0": always).
# Returns one flag per job: 1 enqueued, 0 skipped (its job or result key exists),
# 2 late (on time, score past: not added).
_ENQUEUE_LUA = """
local queue = KEYS[1]
local payloads = tonumber(ARGV[1])
local flags = {}
local timed = false
local jobs = (#KEYS - 1) / 2
for i = 0, jobs - 1 do
  local a = 1 + payloads + 5 * i
  if redis.call('EXISTS', KEYS[2 + 2 * i], KEYS[3 + 2 * i]) == 0 then
    redis.call('PSETEX', KEYS[2 + 2 * i], ARGV[a + 3], ARGV[1 + tonumber(ARGV[a + 4])])
    redis.call('ZADD', queue, ARGV[a + 2], ARGV[a + 1])
    flags[i + 1] = 1
    if ARGV[a + 5] == '1' then timed = true end
  else
    flags[i + 1] = 0
  end
end
if timed then
  -- After the adds: ARQ sees the batch only once the script ends, so this is the
  -- earliest any job of it can start (microseconds; 2^53 holds them exactly).
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  for i = 0, jobs - 1 do
    local a = 1 + payloads + 5 * i
    if flags[i + 1] == 1 and ARGV[a + 5] == '1' and tonumber(ARGV[a + 2]) * 1000 < now_us then
      redis.call('DEL', KEYS[2 + 2 * i])
      redis.call('ZREM', queue, ARGV[a + 1])
      flags[i + 1] = 2
    end
  end
end
return flags
"""


class Outcome(Enum):
    """What the script did with one job."""

    ADDED = 1
    # Its job or result key exists: ARQ already has (or had) this job id.
    HELD = 0
    # Placed ``on_time`` with a run time already past: not added.
    LATE = 2


@dataclass(frozen=True, kw_only=True, slots=True)
class JobSpec:
    """One ARQ job without arguments: the function, the job id, when it may start."""

    job_id: str
    function: str
    # None: at once (the enqueue time), as ``enqueue_job`` without ``_defer_until``.
    run_at: datetime | None = None


class BatchEnqueuer:
    """Enqueue many argument-less ARQ jobs per Redis call, with ARQ's own semantics."""

    def __init__(self, *, redis: ArqRedis, queue_name: str) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self._script = redis.register_script(_ENQUEUE_LUA)

    async def enqueue(self, jobs: Sequence[JobSpec]) -> list[bool]:
        """Enqueue ``jobs`` in one atomic call; per job, whether it was added."""
        return [outcome is Outcome.ADDED for outcome in await self.place(jobs)]

    async def place(self, jobs: Sequence[JobSpec], *, on_time: bool = False) -> list[Outcome]:
        """Enqueue ``jobs`` in one atomic call; per job, what became of it.

        ``on_time``: a job with a ``run_at`` is added only if ARQ gets it no later than
        that (else ``Outcome.LATE``).
        """
        if not jobs:
            return []
        enqueue_time_ms = timestamp_ms()
        # Jobs carry no arguments and share the enqueue time: one payload per function.
        payload_index: dict[str, int] = {}
        payloads: list[bytes] = []
        keys: list[str] = [self.queue_name]
        per_job: list[str | int] = []
        for job in jobs:
            index = payload_index.get(job.function)
            if index is None:
                payloads.append(
                    serialize_job(
                        job.function,
                        (),
                        {},
                        None,
                        enqueue_time_ms,
                        serializer=self.redis.job_serializer,
                    )
                )
                index = payload_index[job.function] = len(payloads)
            score_ms = enqueue_time_ms if job.run_at is None else to_unix_ms(job.run_at)
            # ARQ's rule: the job key outlives its start time by expires_extra_ms.
            expires_ms = score_ms - enqueue_time_ms + self.redis.expires_extra_ms
            keys += [job_key_prefix + job.job_id, result_key_prefix + job.job_id]
            timed = on_time and job.run_at is not None
            per_job += [job.job_id, score_ms, expires_ms, index, int(timed)]
        flags = await self._script(keys=keys, args=[len(payloads), *payloads, *per_job])
        return [Outcome(int(flag)) for flag in flags]
