"""``python -m bench.worker_cpu``: CPU time per job of the worker, a profiling aid.

Wall-clock rates on a shared machine move with the load; the CPU time a process spends
per job moves much less. Each run starts Redis, a fresh database (SQLite, PostgreSQL or
none: ARQ's no-op worker of ``bench.worker``), fills it with queued greetings as
``bench.worker`` does, starts the worker, lets it run ``WARMUP`` jobs, then times
``--jobs`` more: the worker process's CPU seconds (all its threads, ``/proc``) and Redis's,
per thousand jobs, and the jobs/s by ARQ's stamps. ``--code-dir`` measures another
checkout (say, main) with the same harness, so a before/after is one command each.

``--profile cprofile`` writes a cProfile of the worker's main thread to ``--out``
(start-up included); ``--profile pyspy`` records py-spy's collapsed stacks (``--format
raw``, sampled without pausing the worker) to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from arq.connections import ArqRedis

from bench.processes import ROOT, code_env, migrate, postgres_database
from bench.worker import (
    DRAIN_POLL_S,
    DRAIN_TIMEOUT_S,
    _enqueue,
    _fill_database,
    _pool,
    _truncate,
    _worker_settings,
)
from devtools.redis_server import start_redis_server

WARMUP = 300
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int, *, thread: int | None = None) -> float:
    """User plus system CPU seconds of process ``pid`` (every thread, or only ``thread``),
    from /proc."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass(frozen=True, kw_only=True, slots=True)
class Measured:
    jobs: int
    worker_cpu_s: float
    # The worker's main thread only: its event loop (and whatever holds the GIL there).
    loop_cpu_s: float
    redis_cpu_s: float
    span_s: float

    def line(self, label: str) -> str:
        per = 1000 / self.jobs
        return (
            f"{label}: {self.jobs / self.span_s:7.0f} jobs/s  worker CPU "
            f"{self.worker_cpu_s * per * 1000:6.1f} ms/1000 jobs (loop "
            f"{self.loop_cpu_s * per * 1000:6.1f})  redis CPU "
            f"{self.redis_cpu_s * per * 1000:6.1f} ms/1000 jobs"
        )


def _worker_pid(process: subprocess.Popen[bytes], profile: str) -> int:
    """The worker's pid: py-spy's child when py-spy runs it."""
    if profile != "pyspy":
        return process.pid
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{process.pid}/task").iterdir():
            children = (task / "children").read_text().split()
            if children:
                return int(children[0])
        time.sleep(0.05)
    raise RuntimeError("py-spy started no worker")


@contextmanager
def _worker(
    args: Sequence[str], env: dict[str, str], *, code_dir: Path, profile: str, out: Path | None
) -> Iterator[subprocess.Popen[bytes]]:
    command = [sys.executable, "-m", *args]
    if profile == "cprofile":
        assert out is not None
        command = [sys.executable, "-m", "cProfile", "-o", str(out), "-m", *args]
    elif profile == "pyspy":
        assert out is not None
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        command = [
            spy,
            "record",
            "--nonblocking",
            "--format",
            "raw",
            "-r",
            "250",
            "-o",
            str(out),
            "--",
            *command,
        ]
    process = subprocess.Popen(
        command,
        cwd=code_dir,
        env=code_env(env, code_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        if profile == "pyspy":
            # Stop the worker, not py-spy: py-spy writes its output once its child exits.
            os.kill(_worker_pid(process, profile), signal.SIGTERM)
        else:
            process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _wait_count(
    pool: ArqRedis, process: subprocess.Popen[bytes], queue: str, left: int
) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while await pool.zcard(queue) > left:
        if process.poll() is not None:
            raise RuntimeError(f"worker exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("worker did not drain its queue")
        await asyncio.sleep(DRAIN_POLL_S / 5)


async def _measure(
    *,
    redis_url: str,
    redis_pid: int,
    database_url: str | None,
    jobs: int,
    concurrency: int,
    code_dir: Path,
    profile: str,
    out: Path | None,
) -> Measured:
    queue = f"bench:{uuid.uuid4().hex[:8]}"
    async with _pool(redis_url) as pool:
        await pool.flushall()
        if database_url is None:
            task_ids = [str(uuid.uuid4()) for _ in range(WARMUP + jobs)]
            args = [
                "bench.worker",
                "noop-worker",
                "--redis-url",
                redis_url,
                "--queue",
                queue,
                "--concurrency",
                str(concurrency),
            ]
            env = dict(os.environ)
        else:
            task_ids = await _fill_database(database_url, jobs=WARMUP + jobs)
            args = ["worker"]
            env = {
                **os.environ,
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
                "ARQ_QUEUE_NAME": queue,
                "WORKER_CONCURRENCY": str(concurrency),
                "LOG_LEVEL": "INFO",
            }
        warmup, timed = task_ids[:WARMUP], task_ids[WARMUP:]
        await _enqueue(pool, queue_name=queue, task_ids=warmup)
        # The timed jobs wait far in the future (so the no-op worker, in burst mode, stays
        # up) and are made due at once after the warm-up, with the CPU sampled around them.
        for start in range(0, len(timed), 1000):
            await asyncio.gather(
                *(
                    pool.enqueue_job("greeting", _job_id=job_id, _queue_name=queue, _defer_by=3600)
                    for job_id in timed[start : start + 1000]
                )
            )
        with _worker(args, env, code_dir=code_dir, profile=profile, out=out) as process:
            await _wait_count(pool, process, queue, len(timed))
            before = {r.job_id for r in await pool.all_job_results()}
            worker_pid = _worker_pid(process, profile)
            worker_before = cpu_s(worker_pid)
            loop_before = cpu_s(worker_pid, thread=worker_pid)
            redis_before = cpu_s(redis_pid)
            now_ms = int(time.time() * 1000)
            await pool.zadd(queue, dict.fromkeys(timed, now_ms), xx=True)
            await _wait_count(pool, process, queue, 0)
            worker_after = cpu_s(worker_pid)
            loop_after = cpu_s(worker_pid, thread=worker_pid)
            redis_after = cpu_s(redis_pid)
        results = [r for r in await pool.all_job_results() if r.job_id not in before]
        if len(results) != jobs or not all(r.success for r in results):
            raise RuntimeError(f"expected {jobs} successful results, found {len(results)}")
        span = max(r.finish_time for r in results) - min(r.start_time for r in results)
        return Measured(
            jobs=jobs,
            worker_cpu_s=worker_after - worker_before,
            loop_cpu_s=loop_after - loop_before,
            redis_cpu_s=redis_after - redis_before,
            span_s=span.total_seconds(),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--db", choices=("sqlite", "postgres", "none"), default="sqlite")
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--code-dir", type=Path, default=ROOT)
    parser.add_argument("--profile", choices=("none", "cprofile", "pyspy"), default="none")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    label = f"{args.db} @ {args.code_dir}"
    with tempfile.TemporaryDirectory() as workdir_name:
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        try:
            with postgres_database("bench_cpu", code_dir=args.code_dir) as postgres_url:
                template = workdir / "template.db"
                if args.db == "sqlite":
                    migrate(
                        {**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{template}"},
                        code_dir=args.code_dir,
                    )
                for index in range(args.runs):
                    if args.db == "sqlite":
                        database = workdir / f"run{index}.db"
                        shutil.copyfile(template, database)
                        url: str | None = f"sqlite+aiosqlite:///{database}"
                    elif args.db == "postgres":
                        if postgres_url is None:
                            raise SystemExit("set TEST_POSTGRES_URL or BENCH_POSTGRES_URL")
                        asyncio.run(_truncate(postgres_url))
                        url = postgres_url
                    else:
                        url = None
                    measured = asyncio.run(
                        _measure(
                            redis_url=redis.url,
                            redis_pid=redis.process.pid,
                            database_url=url,
                            jobs=args.jobs,
                            concurrency=_worker_settings(args.concurrency).worker_concurrency,
                            code_dir=args.code_dir,
                            profile=args.profile,
                            out=args.out,
                        )
                    )
                    print(measured.line(label), flush=True)
        finally:
            redis.stop()


if __name__ == "__main__":
    main()
