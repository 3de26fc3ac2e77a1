"""Probe (issue 9, item 6): INSERT and UPDATE revoked from the services' role under load.

``python -m bench.probes.revoked_privileges [--code-dir DIR] [--outage-s 10]`` (needs
``TEST_POSTGRES_URL`` or ``BENCH_POSTGRES_URL``: a superuser on a local server). Runs api,
relay and a worker with a side-effecting task (``tests.acceptance.side_effect_worker``)
from ``DIR`` as a role that owns nothing, on a fresh database; submits greetings,
long-running and side-effecting tasks at a steady pace; revokes the role's INSERT and
UPDATE for ``--outage-s`` seconds, then grants them again; waits for every accepted task
to finish and prints:

- the API's answers: 202, 500, 503 with and without Retry-After;
- outcomes dropped: tasks that ran more than once (attempts > 1; none of these tasks
  fails, so only a lost outcome makes one run again), side-effecting tasks run twice or
  refused a second run (failed: the outcome of the first is unknown), tasks unfinished;
- the worker's ``task.write_failing`` / ``task.write_recovered`` lines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.processes import (
    ROOT,
    commit_of,
    free_port,
    http_server,
    module_process,
    postgres_database,
)
from devtools.postgres_role import create_app_role
from devtools.redis_server import start_redis_server

# One submission every PACE_S, taking turns among these (path, body).
PACE_S = 0.05
SUBMISSIONS = (
    ("/api/v1/task/greeting", {"name": "probe"}),
    ("/api/v1/task/non_blocking_long_running_task", {"duration": 2}),
    ("/api/v1/task/blocking_long_running_task", {"duration": 2}),  # side-effecting here
)
SIDE_EFFECTING = "blocking_long_running_task"
BEFORE_S = 3.0
AFTER_S = 3.0
FINISH_TIMEOUT_S = 180.0


async def _submit(base_url: str, seconds: float, answers: Counter[str], ids: list[str]) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10.0, trust_env=False) as client:
        deadline = time.monotonic() + seconds
        turn = 0
        while time.monotonic() < deadline:
            path, body = SUBMISSIONS[turn % len(SUBMISSIONS)]
            turn += 1
            try:
                answer = await client.post(path, json=body)
            except httpx.TransportError:
                answers["no answer"] += 1
            else:
                code = answer.status_code
                if code == 503:
                    with_header = "retry-after" in answer.headers
                    answers["503 with Retry-After" if with_header else "503 without"] += 1
                else:
                    answers[str(code)] += 1
                if code == 202:
                    ids.append(answer.json()["task_id"])
            await asyncio.sleep(PACE_S)


async def _logged(path: Path, line: str, *, timeout_s: float = 60.0) -> None:
    """Wait until a component's log holds ``line`` (it has started)."""
    deadline = time.monotonic() + timeout_s
    while line not in await asyncio.to_thread(path.read_text, errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path.name}: no {line!r} within {timeout_s:g} s")
        await asyncio.sleep(0.1)


async def _finished(admin_url: str, ids: list[str]) -> dict[str, tuple[str, int, str]]:
    """Each accepted task's (status, attempts, name), once all are terminal or time is up."""
    engine = create_async_engine(admin_url)
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    try:
        while True:
            async with engine.connect() as connection:
                rows = (
                    await connection.execute(
                        text("SELECT id, status, attempts, name FROM tasks WHERE id = ANY(:ids)"),
                        {"ids": ids},
                    )
                ).all()
            tasks = {row[0]: (row[1], row[2], row[3]) for row in rows}
            done = all(status in ("succeeded", "failed") for status, _, _ in tasks.values())
            if done or time.monotonic() > deadline:
                return tasks
            await asyncio.sleep(1.0)
    finally:
        await engine.dispose()


async def _probe(admin_url: str, *, code_dir: Path, outage_s: float, workdir: Path) -> None:
    role = await create_app_role(admin_url)
    redis = start_redis_server(workdir=workdir / "redis")
    side_effects = workdir / "side_effects.log"
    side_effects.touch()
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": role.url,
        "REDIS_URL": redis.url,
        "API_PORT": str(port),
        "API_KEYS": "",
        "RELAY_RATE": "0",
        "RELAY_LIMITS": "",
        "RELAY_MAX_INFLIGHT": "0",
        "LOG_LEVEL": "INFO",
        "SIDE_EFFECT_LOG": str(side_effects),
    }
    answers: Counter[str] = Counter()
    ids: list[str] = []
    try:
        with ExitStack() as stack:
            base_url = stack.enter_context(http_server(["api"], env, port, code_dir=code_dir))
            for name, module in (
                ("relay", "relay"),
                ("worker", "tests.acceptance.side_effect_worker"),
            ):
                log = stack.enter_context((workdir / f"{name}.log").open("wb"))
                stack.enter_context(module_process([module], env, output=log, code_dir=code_dir))
            await _logged(workdir / "worker.log", "worker.ready")
            await _logged(workdir / "relay.log", "relay.started")
            load = asyncio.create_task(
                _submit(base_url, BEFORE_S + outage_s + AFTER_S, answers, ids)
            )
            await asyncio.sleep(BEFORE_S)
            await role.revoke_writes()
            await asyncio.sleep(outage_s)
            await role.grant_writes()
            await load
            tasks = await _finished(admin_url, ids)
    finally:
        redis.stop()
        await role.drop()

    starts = Counter(line.split()[1] for line in side_effects.read_text().splitlines() if line)
    ran_again = sum(1 for _, attempts, _ in tasks.values() if attempts > 1)
    unfinished = sum(1 for status, _, _ in tasks.values() if status not in ("succeeded", "failed"))
    side_effecting = sum(1 for *_, name in tasks.values() if name == SIDE_EFFECTING)
    refused = sum(
        1
        for status, attempts, name in tasks.values()
        if name == SIDE_EFFECTING and status == "failed" and attempts > 1
    )
    worker_log = (workdir / "worker.log").read_text(errors="replace")
    print(f"answers during the run: {dict(sorted(answers.items()))}")
    print(
        f"tasks accepted: {len(ids)}; ran more than once (outcome dropped): {ran_again}; "
        f"side-effecting: {side_effecting}, of which run twice "
        f"{sum(1 for count in starts.values() if count > 1)} and refused a second run "
        f"(failed, outcome unknown) {refused}; "
        f"unfinished after {FINISH_TIMEOUT_S:g} s: {unfinished}; "
        f"failed: {sum(1 for status, _, _ in tasks.values() if status == 'failed')}"
    )
    print(
        f"worker lines: task.write_failing={worker_log.count('task.write_failing')} "
        f"task.write_recovered={worker_log.count('task.write_recovered')} "
        f"task.start_failed={worker_log.count('task.start_failed')} "
        f"Traceback={worker_log.count('Traceback')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code-dir", type=Path, default=ROOT, help="checkout to run")
    parser.add_argument("--outage-s", type=float, default=10.0, help="seconds revoked")
    parser.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir)")
    args = parser.parse_args()
    commit = commit_of(args.code_dir)
    print(f"code: {args.code_dir.resolve()} ({commit}); INSERT, UPDATE revoked {args.outage_s:g} s")
    with ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="probe-revoked-"))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        admin_url = stack.enter_context(postgres_database("probe_revoked", code_dir=args.code_dir))
        if admin_url is None:
            raise SystemExit("set TEST_POSTGRES_URL or BENCH_POSTGRES_URL (a superuser's URL)")
        asyncio.run(
            _probe(admin_url, code_dir=args.code_dir, outage_s=args.outage_s, workdir=workdir)
        )


if __name__ == "__main__":
    main()
