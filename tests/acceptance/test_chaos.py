"""Chaos soak (issue #4): a thousand mixed tasks while a relay, a worker and Redis fail.

Api, two relays and two workers run as real processes, with the cluster rate, a
per-task rate and an in-flight cap in force. While the tasks flow, the test SIGKILLs a
relay, SIGKILLs a worker (each replaced at once) and restarts Redis empty on the same
port, each at a random moment (the seed is printed; set ``CHAOS_SEED`` to replay one).
Then, from the database's audit trail and the side-effect log, it checks guarantees 2-4:
every task terminal, retriable ones succeeded, side-effecting ones started at most once,
no rate or cap exceeded, and the event history consistent. Run with ``-s`` for figures.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.figures import max_in_window
from devtools.redis_server import RedisServer, free_port, start_redis_server
from tests.acceptance.processes import Cluster, Component, cluster
from tests.acceptance.side_effect_worker import SIDE_EFFECT_LOG_ENV
from tests.support import wait_for
from throttler.catalog import CATALOG
from throttler.db import (
    SessionFactory,
    create_engine,
    create_read_session_factory,
    create_session_factory,
)
from throttler.models import OutboxEntry, Task, TaskEvent, utcnow
from throttler.outbox import submit_task
from throttler.settings import Settings
from throttler.statuses import TERMINAL_STATUSES, EventKind, TaskStatus

# About a minute per database; CHAOS_SOAK=0 leaves it out of a quick local run.
CHAOS_ENV = "CHAOS_SOAK"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        os.environ.get(CHAOS_ENV) == "0",
        reason=f"chaos soak left out by {CHAOS_ENV}=0 (about a minute per database)",
    ),
]

SIDE_EFFECT_WORKER = "tests.acceptance.side_effect_worker"
GREETING = "greeting"
SLEEP = "non_blocking_long_running_task"
DOWNLOAD = "download"
MISSILE = "blocking_long_running_task"  # LaunchMissile in the side-effect worker
MIX = {GREETING: 380, SLEEP: 300, DOWNLOAD: 200, MISSILE: 120}
RETRIABLE = frozenset({GREETING, SLEEP, DOWNLOAD})
RATE, BURST = 60, 5
DOWNLOAD_RATE, DOWNLOAD_BURST = 15, 3
MISSILE_INFLIGHT = 4
LIMITS = (
    f"task:{DOWNLOAD} rate={DOWNLOAD_RATE}/s burst={DOWNLOAD_BURST}; "
    f"task:{MISSILE} inflight={MISSILE_INFLIGHT}"
)
# Every failure strikes within this span (seconds after the first submission), while
# the backlog is still being dispatched (1,000 tasks at 60/s take about 17 s).
CHAOS_WINDOW_S = (2.0, 14.0)
# The api takes about 20 submissions/s here (2 cores shared with every component), so
# a share goes through it and the rest is inserted as it would insert them.
VIA_API = 250
SUBMIT_CONCURRENCY = 16
INSERT_BATCH = 25
SETTLE_TIMEOUT_S = 60.0
UNKNOWN_OUTCOME = re.compile(r"outcome\b.*\bunknown")
EFFECT_LINE = re.compile(r"start (\S+) pid=(\d+)")
# Events after which a task no longer runs (a retry goes back to ARQ first).
RUN_ENDS = frozenset(
    {
        EventKind.SUCCEEDED,
        EventKind.FAILED,
        EventKind.CANCELLED,
        EventKind.RETRYING,
        EventKind.REQUEUED,
    }
)
INFLIGHT_ENDS = frozenset(
    {EventKind.SUCCEEDED, EventKind.FAILED, EventKind.CANCELLED, EventKind.REQUEUED}
)


@pytest.fixture
def redis_port() -> int:
    """A fixed port for this test's own Redis, restarted on the same port mid-run."""
    return free_port()


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=database_url))
    yield engine
    await engine.dispose()


@pytest.fixture
def reader(engine: AsyncEngine) -> SessionFactory:
    """Read-only sessions: on SQLite they never take the write lock from the components."""
    return create_read_session_factory(engine)


@pytest.fixture
def writer(engine: AsyncEngine) -> SessionFactory:
    return create_session_factory(engine)


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    task_id: str
    at: float
    event: str
    detail: dict[str, Any]


@dataclass(kw_only=True)
class Chaos:
    """The processes the test strikes, and when each failure happened."""

    running: Cluster
    redis: RedisServer
    redis_port: int
    redis_dir: Path
    relays: list[Component]
    workers: list[Component]
    rng: random.Random
    log: list[str] = field(default_factory=list)
    relay_killed_at: float = 0.0
    worker_killed_at: float = 0.0
    killed_worker_id: str = ""
    redis_lost_at: float = 0.0
    redis_back_at: float = 0.0

    def check_alive(self) -> None:
        for component in [*self.relays, *self.workers]:
            if component.process.poll() is not None:
                raise AssertionError(f"{component.module} exited:\n{component.output()[-3000:]}")

    async def kill_relay(self) -> None:
        victim = self.rng.choice(self.relays)
        self.check_alive()  # the victim too: a process that died by itself is a failure
        victim.kill()
        self.relay_killed_at = time.time()
        self.relays.remove(victim)
        self.relays.append(self.running.start("relay"))
        self.log.append(f"relay pid={victim.process.pid} SIGKILLed")

    async def kill_worker(self) -> None:
        victim = self.rng.choice(self.workers)
        self.check_alive()
        victim.kill()
        self.worker_killed_at = time.time()
        self.killed_worker_id = f"{socket.gethostname()}-{victim.process.pid}"
        self.workers.remove(victim)
        self.workers.append(self.running.start(SIDE_EFFECT_WORKER))
        self.log.append(f"worker pid={victim.process.pid} SIGKILLed")

    async def restart_redis(self) -> None:
        await asyncio.to_thread(self.redis.stop)
        self.redis_lost_at = time.time()
        self.redis = await asyncio.to_thread(
            start_redis_server, port=self.redis_port, workdir=self.redis_dir
        )
        self.redis_back_at = time.time()
        self.check_alive()
        self.log.append(
            f"redis restarted empty, down {self.redis_back_at - self.redis_lost_at:.3f}s"
        )


async def _at(moment: float, action: Any) -> None:
    await asyncio.sleep(max(0.0, moment - time.time()))
    await action()


async def _post(http: httpx.AsyncClient, name: str, body: dict[str, Any]) -> str:
    """Submit one task; wait out a 503 (the database busy) as a client would."""
    for _ in range(50):
        answer = await http.post(f"/api/v1/task/{name}", json=body)
        if answer.status_code == 202:
            task_id: str = answer.json()["task_id"]
            return task_id
        assert answer.status_code == 503, answer.text
        await asyncio.sleep(float(answer.headers.get("retry-after", "0.1")))
    raise AssertionError(f"the api kept answering 503 to {name}")


def _requests(rng: random.Random, file_server: str) -> list[tuple[str, dict[str, Any]]]:
    requests: list[tuple[str, dict[str, Any]]] = []
    for index in range(MIX[GREETING]):
        requests.append((GREETING, {"name": f"chaos-{index}"}))
    for _ in range(MIX[SLEEP]):
        requests.append((SLEEP, {"duration": rng.randint(0, 1)}))
    for index in range(MIX[DOWNLOAD]):
        requests.append((DOWNLOAD, {"url": f"{file_server}?n={index}"}))
    for _ in range(MIX[MISSILE]):
        requests.append((MISSILE, {"duration": rng.randint(0, 1)}))
    rng.shuffle(requests)
    return requests


async def _submit_via_api(
    http: httpx.AsyncClient, requests: Sequence[tuple[str, dict[str, Any]]]
) -> list[str]:
    slots = asyncio.Semaphore(SUBMIT_CONCURRENCY)

    async def one(name: str, body: dict[str, Any]) -> str:
        async with slots:
            return await _post(http, name, body)

    return list(await asyncio.gather(*(one(name, body) for name, body in requests)))


async def _insert_directly(
    writer: SessionFactory, requests: Sequence[tuple[str, dict[str, Any]]]
) -> list[str]:
    """Submit as the api does (same validation, host and transaction), a batch at a time."""
    ids: list[str] = []
    for start in range(0, len(requests), INSERT_BATCH):
        async with writer.begin() as session:
            for name, body in requests[start : start + INSERT_BATCH]:
                params = CATALOG[name].input_model.model_validate(body)
                task = await submit_task(
                    session,
                    name=name,
                    account="default",
                    payload=params.model_dump(mode="json"),
                    now=utcnow(),
                    host=params.limit_host(),
                )
                ids.append(task.id)
    return ids


async def _wait_log(component: Component, text: str) -> None:
    async def logged() -> bool:
        assert component.process.poll() is None, component.output()[-3000:]
        return text in component.output()

    await wait_for(logged, timeout_s=30, message=f"{component.module} to log {text!r}")


async def _wait_api(http: httpx.AsyncClient, api: Component) -> None:
    async def ready() -> bool:
        assert api.process.poll() is None, api.output()[-3000:]
        try:
            return (await http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(ready, timeout_s=30, message="the api to be ready")


def _peak(events: Sequence[Event], *, starts: str, ends: frozenset[str]) -> int:
    """Most tasks at once between a ``starts`` event and one of ``ends`` (ends first on ties)."""
    changes = sorted(
        (e.at, 1 if e.event == starts else 0, e.task_id)
        for e in events
        if e.event == starts or e.event in ends
    )
    current: set[str] = set()
    peak = 0
    for _, entering, task_id in changes:
        if entering:
            current.add(task_id)
        else:
            current.discard(task_id)
        peak = max(peak, len(current))
    return peak


async def _census(reader: SessionFactory) -> str:
    """Tasks by name and status, and the outbox size: what a timeout leaves behind."""
    async with reader() as session:
        counts = await session.execute(
            select(Task.name, Task.status, func.count()).group_by(Task.name, Task.status)
        )
        outbox = await session.scalar(select(func.count()).select_from(OutboxEntry))
    return f"outbox={outbox} " + " ".join(f"{n}/{s}={c}" for n, s, c in counts)


def _next_after(history: Sequence[Event], index: int, kind: str) -> Event | None:
    return next((e for e in history[index + 1 :] if e.event == kind), None)


async def test_chaos_soak(
    database_url: str,
    reader: SessionFactory,
    writer: SessionFactory,
    file_server: str,
    redis_port: int,
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or time.time_ns() % 1_000_000)
    print(f"\nchaos seed={seed} database={database_url.split(':', 1)[0]}")
    rng = random.Random(seed)
    redis_dir = tmp_path / "redis"
    effects = tmp_path / "effects.log"
    api_port = free_port()
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "API_PORT": str(api_port),
        "DOWNLOAD_ALLOW_PRIVATE": "true",
        "LOG_LEVEL": "INFO",
        "RELAY_RATE": str(RATE),
        "RELAY_BURST": str(BURST),
        "RELAY_LIMITS": LIMITS,
        "RELAY_CLAIM_LEASE_S": "1",
        "RECONCILE_INTERVAL_S": "0.5",
        "WORKER_LEASE_S": "1.5",
        "WORKER_SHUTDOWN_GRACE_S": "1",
        SIDE_EFFECT_LOG_ENV: str(effects),
    }
    requests = _requests(rng, file_server)
    moments = {name: rng.uniform(*CHAOS_WINDOW_S) for name in ("relay", "worker", "redis")}
    redis = start_redis_server(port=redis_port, workdir=redis_dir)
    chaos: Chaos | None = None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as http:
            with cluster(env=env, log_dir=tmp_path) as running:
                api = running.start("api")
                workers = [running.start(SIDE_EFFECT_WORKER) for _ in range(2)]
                relays = [running.start("relay") for _ in range(2)]
                chaos = Chaos(
                    running=running,
                    redis=redis,
                    redis_port=redis_port,
                    redis_dir=redis_dir,
                    relays=relays,
                    workers=workers,
                    rng=rng,
                )
                await _wait_api(http, api)
                for worker in workers:
                    await _wait_log(worker, "worker.ready")

                started_at = time.time()
                strikes = [
                    asyncio.create_task(_at(started_at + moments["relay"], chaos.kill_relay)),
                    asyncio.create_task(_at(started_at + moments["worker"], chaos.kill_worker)),
                    asyncio.create_task(_at(started_at + moments["redis"], chaos.restart_redis)),
                ]
                via_api, direct = requests[:VIA_API], requests[VIA_API:]
                api_ids, direct_ids = await asyncio.gather(
                    _submit_via_api(http, via_api), _insert_directly(writer, direct)
                )
                task_ids = api_ids + direct_ids
                submitted_s = time.time() - started_at
                await asyncio.gather(*strikes)
                current = chaos

                async def settled() -> bool:
                    current.check_alive()
                    async with reader() as session:
                        open_tasks = await session.scalar(
                            select(func.count())
                            .select_from(Task)
                            .where(Task.status.not_in(list(TERMINAL_STATUSES)))
                        )
                        outbox = await session.scalar(select(func.count()).select_from(OutboxEntry))
                    return open_tasks == 0 and outbox == 0

                print(
                    f"submitted {len(task_ids)} ({VIA_API} via the api) in {submitted_s:.2f}s; "
                    + "; ".join(chaos.log)
                )
                try:
                    await wait_for(
                        settled,
                        timeout_s=SETTLE_TIMEOUT_S,
                        interval_s=0.2,
                        message="every task terminal and the outbox empty",
                    )
                except AssertionError as timed_out:
                    raise AssertionError(f"{timed_out}\n{await _census(reader)}") from None
                settled_s = time.time() - started_at
    finally:
        (chaos.redis if chaos is not None else redis).stop()
    assert chaos is not None

    async with reader() as session:
        tasks = {
            task_id: (name, status, error)
            for task_id, name, status, error in await session.execute(
                select(Task.id, Task.name, Task.status, Task.error)
            )
        }
        rows = await session.execute(
            select(TaskEvent.task_id, TaskEvent.at, TaskEvent.event, TaskEvent.detail).order_by(
                TaskEvent.id
            )
        )
        events = [
            Event(task_id=task_id, at=at.timestamp(), event=event, detail=detail)
            for task_id, at, event, detail in rows
        ]
    history: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        history[event.task_id].append(event)
    effect_lines = effects.read_text().splitlines() if effects.exists() else []
    matches = [EFFECT_LINE.fullmatch(line) for line in effect_lines]
    assert all(matches), effect_lines[:5]
    effect_starts = Counter(match.group(1) for match in matches if match)

    # --- figures ------------------------------------------------------------------------
    by_name: dict[str, list[str]] = defaultdict(list)
    for task_id, (name, _, _) in tasks.items():
        by_name[name].append(task_id)
    queued = [e for e in events if e.event == EventKind.QUEUED]
    terminal_at = [e.at for e in events if e.event in TERMINAL_STATUSES]
    done_by_name = {
        name: max(history[task_id][-1].at for task_id in ids) - started_at
        for name, ids in sorted(by_name.items())
    }
    requeued_after_restart = [
        e for e in events if e.event == EventKind.REQUEUED and e.at >= chaos.redis_lost_at
    ]
    requeue_delays = [e.at - chaos.redis_lost_at for e in requeued_after_restart]
    requeue_to_arq = []
    for e in requeued_after_restart:
        story = history[e.task_id]
        again = _next_after(story, story.index(e), EventKind.QUEUED)
        if again is not None:
            requeue_to_arq.append(again.at - chaos.redis_lost_at)
    failed_unknown = [
        task_id
        for task_id, (name, status, error) in tasks.items()
        if name == MISSILE and status == TaskStatus.FAILED
    ]
    reruns = []
    for story in history.values():
        for index, event in enumerate(story):
            if (
                event.event == EventKind.STARTED
                and event.detail.get("worker") == chaos.killed_worker_id
                and event.at <= chaos.worker_killed_at
            ):
                following = story[index + 1] if index + 1 < len(story) else None
                if following is not None and following.event == EventKind.STARTED:
                    reruns.append(following.at - chaos.worker_killed_at)
    worst_cluster = max_in_window([e.at for e in queued], 1.0)
    download_ids = set(by_name[DOWNLOAD])
    worst_download = max_in_window([e.at for e in queued if e.task_id in download_ids], 1.0)
    missile_ids = set(by_name[MISSILE])
    missile_events = [e for e in events if e.task_id in missile_ids]
    peak_running = _peak(missile_events, starts=EventKind.STARTED, ends=frozenset(RUN_ENDS))
    peak_inflight = _peak(missile_events, starts=EventKind.QUEUED, ends=INFLIGHT_ENDS)

    def span(values: Sequence[float]) -> str:
        return f"{min(values):.2f}..{max(values):.2f}s" if values else "n/a"

    print(
        "\n".join(
            [
                "strikes at (s after first submission): "
                + ", ".join(f"{k}={v:.2f}" for k, v in moments.items()),
                *chaos.log,
                f"submitted {len(task_ids)} ({VIA_API} via the api) in {submitted_s:.2f}s; "
                f"settled after {settled_s:.2f}s; "
                f"last terminal event {max(terminal_at) - started_at:.2f}s after start ("
                + ", ".join(f"{name} {s:.1f}s" for name, s in done_by_name.items())
                + ")",
                f"redis restart: {len(requeued_after_restart)} requeued, back in the outbox "
                f"{span(requeue_delays)} after the loss, re-queued to ARQ {span(requeue_to_arq)}",
                f"missiles failed, outcome unknown: {len(failed_unknown)} of {len(missile_ids)}",
                f"worker death: {len(reruns)} running task(s) re-run {span(reruns)} after SIGKILL",
                f"worst 1s window: cluster {worst_cluster} (limit {RATE + BURST}), "
                f"download {worst_download} (limit {DOWNLOAD_RATE + DOWNLOAD_BURST}); "
                f"missiles peak running {peak_running}, in flight {peak_inflight} "
                f"(cap {MISSILE_INFLIGHT})",
            ]
        )
    )

    # --- guarantee 2: every accepted task terminal, exactly once ------------------------
    assert set(task_ids) == set(tasks)
    assert len(tasks) == sum(MIX.values())
    not_final = {t: s for t, (_, s, _) in tasks.items() if s not in TERMINAL_STATUSES}
    assert not not_final, not_final
    for task_id, story in history.items():
        kinds = Counter(e.event for e in story)
        assert kinds[EventKind.SUBMITTED] == 1, (task_id, story)
        assert 1 <= kinds[EventKind.QUEUED] <= 1 + kinds[EventKind.REQUEUED], (task_id, story)
        for index, event in enumerate(story):
            if event.event == EventKind.REQUEUED and not _next_after(
                story, index, EventKind.QUEUED
            ):
                # Not dispatched again only because an attempt already under way when
                # recovery gave up on it (its write not yet committed) ended the task:
                # the relay then just drops the outbox row.
                final_attempt = story[-1].detail.get("attempt")
                began = [
                    e.at
                    for e in story
                    if e.event == EventKind.STARTED and e.detail["attempt"] == final_attempt
                ]
                assert began, story
                assert began[0] <= event.at, story
        assert sum(kinds[k] for k in TERMINAL_STATUSES) == 1, (task_id, story)
        assert story[-1].event in TERMINAL_STATUSES, (task_id, story)

    # --- guarantee 4: retriable tasks succeeded, side-effecting ones ran at most once ---
    failed_retriable = {
        t: (n, s, e) for t, (n, s, e) in tasks.items() if n in RETRIABLE and s != "succeeded"
    }
    assert not failed_retriable, failed_retriable
    twice = {task_id: count for task_id, count in effect_starts.items() if count > 1}
    assert not twice, twice
    assert set(effect_starts) <= missile_ids
    for task_id in missile_ids:
        _, status, error = tasks[task_id]
        if status == TaskStatus.SUCCEEDED:
            assert effect_starts[task_id] == 1, (task_id, history[task_id])
        else:
            assert status == TaskStatus.FAILED, (task_id, status)
            assert error is not None, task_id
            assert UNKNOWN_OUTCOME.search(error), (task_id, error)

    # --- guarantee 3: rates and the in-flight cap ----------------------------------------
    assert worst_cluster <= RATE + BURST
    assert max_in_window([e.at for e in queued], 0.5) <= RATE * 0.5 + BURST
    assert worst_download <= DOWNLOAD_RATE + DOWNLOAD_BURST
    assert peak_running <= MISSILE_INFLIGHT
    assert peak_inflight <= MISSILE_INFLIGHT
