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

The batch travels as one line per job in a single argument, split by the script, with
the keys built there from ARQ's prefixes: a few arguments per call instead of seven per
job, each of which redis-py would encode on its own.
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

# One line per job, so a batch is a handful of Redis arguments instead of seven per job:
# redis-py encodes each argument on its own, which cost ~14 ms of Python per 1,000 jobs;
# as lines, ~2 ms (measured with 1,000 jobs, half with a run time). The line ends in the
# job id, the one free-form field, so only a newline in a job id could break it: refused
# in ``place`` (``throttler.job_ids`` makes ids of uuid4 text, "@" and digits).
_LINE_END = "\n"

# KEYS: the queue. The job and result keys are built here from ARQ's prefixes (ARGV), not
# declared in KEYS: that only matters to Redis Cluster, which ARQ itself does not support
# (its enqueue_job and worker touch keys of many slots in one transaction).
# ARGV: the job key prefix, the result key prefix, the enqueue time (ms: the score of a job
# without a run time), ARQ's expires_extra_ms, on time ("1": a job with a run time is added
# only if its score is not past by the script's end; "0": always), the jobs, then the
# distinct serialized jobs. The jobs: per job a line "SCORE INDEX JOB_ID\n", SCORE its run
# time in ms (empty: the enqueue time), INDEX its payload's (1-based).
# Returns one flag per job: 1 enqueued, 0 skipped (its job or result key exists),
# 2 late (on time, score past: not added).
_ENQUEUE_LUA = """
local queue = KEYS[1]
local job_prefix, result_prefix = ARGV[1], ARGV[2]
local enqueue_ms, extra_ms, on_time = tonumber(ARGV[3]), ARGV[4], ARGV[5] == '1'
local flags = {}
-- Added jobs with a run time, when on time: position, job key, id, score.
local timed = {}
local i = 0
for score, index, id in string.gmatch(ARGV[6], '(%-?%d*) (%d+) ([^\\n]*)\\n') do
  i = i + 1
  local job_key = job_prefix .. id
  if redis.call('EXISTS', job_key, result_prefix .. id) == 0 then
    local payload = ARGV[6 + tonumber(index)]
    if score == '' then
      -- ARQ's rule: the job key outlives its start time by expires_extra_ms.
      redis.call('PSETEX', job_key, extra_ms, payload)
      redis.call('ZADD', queue, ARGV[3], id)
    else
      local expires_ms = tonumber(score) - enqueue_ms + tonumber(extra_ms)
      redis.call('PSETEX', job_key, string.format('%d', expires_ms), payload)
      redis.call('ZADD', queue, score, id)
      if on_time then timed[#timed + 1] = {i, job_key, id, tonumber(score)} end
    end
    flags[i] = 1
  else
    flags[i] = 0
  end
end
if #timed > 0 then
  -- After the adds: ARQ sees the batch only once the script ends, so this is the
  -- earliest any job of it can start (microseconds; 2^53 holds them exactly).
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  for _, job in ipairs(timed) do
    if job[4] * 1000 < now_us then
      redis.call('DEL', job[2])
      redis.call('ZREM', queue, job[3])
      flags[job[1]] = 2
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


# The script's flags, without an Enum lookup per job.
_OUTCOMES = {outcome.value: outcome for outcome in Outcome}


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
        lines: list[str] = []
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
            score = "" if job.run_at is None else to_unix_ms(job.run_at)
            lines.append(f"{score} {index} {job.job_id}{_LINE_END}")
        text = "".join(lines)
        if text.count(_LINE_END) != len(jobs):
            bad = [job.job_id for job in jobs if _LINE_END in job.job_id]
            raise ValueError(f"job ids must not contain a newline: {bad!r}")
        flags = await self._script(
            keys=[self.queue_name],
            args=[
                job_key_prefix,
                result_key_prefix,
                enqueue_time_ms,
                self.redis.expires_extra_ms,
                int(on_time),
                text,
                *payloads,
            ],
        )
        if len(flags) != len(jobs):
            raise RuntimeError(
                f"the enqueue script answered {len(flags)} flags for {len(jobs)} jobs"
            )
        return [_OUTCOMES[flag] for flag in flags]
