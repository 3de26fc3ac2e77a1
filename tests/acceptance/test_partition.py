"""Network partition (issue #13): host B cut off from PostgreSQL and/or Redis, then back.

Host A (api, relay, side-effect worker) runs in the root namespace on 127.0.0.1; host B
(relay, side-effect worker) runs in a network namespace of its own and reaches PostgreSQL
and Redis over two veth links (tests.acceptance.netns). Under load, with a cluster rate,
a per-task rate and an in-flight cap in force, the test waits until B holds work (outbox
rows leased to its relay, attempts running on its worker) and is in the middle of a
claim (its relay holds the claims' lock: the forwarders hold B's traffic while the test
looks, then the link goes down), cuts B's links for ``CUT_S``, and heals them. Three
scenarios: both links (B entirely), the database link alone, the Redis link alone.

During the cut, A must take over what B held: B's leased outbox rows (deleted or leased
to another relay once the lease lapses) and, when B loses Redis, the attempts B's worker
was running (its in-progress leases lapse; A's worker ends them: requeued, or failed as
outcome unknown when side-effecting). When B comes back, whatever it still had in hand
(a lease, a start or an outcome in flight) must change nothing A now owns. At the end,
from the audit trail and the side-effect log, the chaos soak's checks: every accepted
task ends exactly once, side-effecting ones start at most once, no rate window or cap
is exceeded.

PostgreSQL only (a SQLite file cannot be shared between hosts): needs TEST_POSTGRES_URL
on 127.0.0.1 and root for the namespace; skips with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.figures import max_in_window
from devtools.redis_server import RedisServer, free_port, start_redis_server
from tests.acceptance.netns import Forwarder, Host, netns_unavailable, partitioned_host, start_in
from tests.acceptance.processes import Component, cluster
from tests.acceptance.side_effect_worker import SIDE_EFFECT_LOG_ENV
from tests.acceptance.test_chaos import (
    EFFECT_LINE,
    INFLIGHT_ENDS,
    RUN_ENDS,
    UNKNOWN_OUTCOME,
    Event,
    _census,
    _insert_directly,
    _next_after,
    _peak,
    _post,
)
from tests.conftest import _truncate_all
from tests.support import wait_for
from throttler.db import (
    SessionFactory,
    create_engine,
    create_read_session_factory,
    create_session_factory,
)
from throttler.models import OutboxEntry, Task, TaskEvent
from throttler.settings import Settings
from throttler.statuses import TERMINAL_STATUSES, EventKind, TaskStatus

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(240)]

SIDE_EFFECT_WORKER = "tests.acceptance.side_effect_worker"
GREETING = "greeting"
SLEEP = "non_blocking_long_running_task"
MISSILE = "blocking_long_running_task"  # LaunchMissile in the side-effect worker
MIX = {GREETING: 300, SLEEP: 100, MISSILE: 40}
RETRIABLE = frozenset({GREETING, SLEEP})
RATE, BURST = 25, 5
SLEEP_RATE, SLEEP_BURST = 8, 2
MISSILE_INFLIGHT = 3
LIMITS = (
    f"task:{SLEEP} rate={SLEEP_RATE}/s burst={SLEEP_BURST}; "
    f"task:{MISSILE} inflight={MISSILE_INFLIGHT}"
)
# Greetings submitted through A's api once B's work is taken over: A alone must dispatch
# them before B comes back (a relay cut off mid-claim must not hold the claims' lock).
DURING_CUT = 30
CUT_S = 16.0
# How long to wait for B to hold work before cutting anyway.
HOLD_TIMEOUT_S = 15.0
RELAY_LEASE_S = 2.0
WORKER_LEASE_S = 1.5
# B's leases must be A's within this (the lease, a reconcile pass, process noise).
TAKEOVER_S = 10.0
SETTLE_TIMEOUT_S = 60.0
STARTUP_S = 60.0
POSTGRES_PORT = 5432


@dataclass(frozen=True, kw_only=True, slots=True)
class Cut:
    database: bool
    redis: bool


SCENARIOS = {
    "host": Cut(database=True, redis=True),
    "database": Cut(database=True, redis=False),
    "redis": Cut(database=False, redis=True),
}


@pytest.fixture
def host_b() -> Iterator[Host]:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(f"partition test: {reason}")
    with partitioned_host() as host:
        yield host


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str:
    """This process's PostgreSQL database, emptied (PostgreSQL only: B shares it)."""
    url: str = request.getfixturevalue("postgres_database")
    parsed = make_url(url)
    if parsed.host not in ("127.0.0.1", "localhost") or (parsed.port or POSTGRES_PORT) != 5432:
        pytest.skip(f"partition test forwards to PostgreSQL on 127.0.0.1:5432, not {parsed.host}")
    asyncio.run(_truncate_all(url))
    return url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=database_url))
    yield engine
    await engine.dispose()


@pytest.fixture
def reader(engine: AsyncEngine) -> SessionFactory:
    return create_read_session_factory(engine)


@pytest.fixture
def writer(engine: AsyncEngine) -> SessionFactory:
    return create_session_factory(engine)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis_server(workdir=tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def forwarders(host_b: Host, redis: RedisServer) -> Iterator[list[Forwarder]]:
    """Forward B's database link to PostgreSQL and its Redis link to the test's Redis."""
    database_port, redis_port = free_port(), free_port()
    started: list[Forwarder] = []
    try:
        started.append(
            Forwarder(
                listen=(host_b.database.outer_address, database_port),
                target=("127.0.0.1", POSTGRES_PORT),
            ).start()
        )
        started.append(
            Forwarder(
                listen=(host_b.redis.outer_address, redis_port),
                target=("127.0.0.1", redis.port),
            ).start()
        )
        yield started
    finally:
        for forwarder in started:
            forwarder.stop()


def _requests(rng: random.Random) -> list[tuple[str, dict[str, Any]]]:
    requests: list[tuple[str, dict[str, Any]]] = []
    requests += [(GREETING, {"name": f"partition-{i}"}) for i in range(MIX[GREETING])]
    requests += [(SLEEP, {"duration": rng.randint(1, 3)}) for _ in range(MIX[SLEEP])]
    requests += [(MISSILE, {"duration": rng.randint(1, 2)}) for _ in range(MIX[MISSILE])]
    rng.shuffle(requests)
    return requests


def _relay_prefix(component: Component) -> str:
    """What B's relay id starts with (relay.relay.new_relay_id)."""
    return f"{socket.gethostname()[:40]}-{component.process.pid}-"


def _worker_id(component: Component) -> str:
    return f"{socket.gethostname()}-{component.process.pid}"


async def _leased_to(reader: SessionFactory, prefix: str) -> dict[int, str]:
    """Outbox rows leased to a relay whose id starts with ``prefix``: id -> task id."""
    async with reader() as session:
        rows = await session.execute(
            select(OutboxEntry.id, OutboxEntry.task_id).where(
                OutboxEntry.claimed_by.startswith(prefix)
            )
        )
        return {outbox_id: task_id for outbox_id, task_id in rows}


async def _holds_claim_lock(reader: SessionFactory, to_database: Forwarder) -> bool:
    """Whether one of B's sessions holds the claims' lock (a claim under way)."""
    ports = sorted(to_database.upstream_ports)
    async with reader() as session:
        held = await session.scalar(
            text(
                "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted AND a.client_port = ANY(:ports)"
            ),
            {"ports": ports},
        )
    return bool(held)


async def _rows(reader: SessionFactory, outbox_ids: dict[int, str]) -> list[tuple[Any, ...]]:
    """What became of outbox rows: lease, and the task's status and queued_at."""
    async with reader() as session:
        rows = await session.execute(
            select(
                OutboxEntry.id,
                OutboxEntry.claimed_by,
                OutboxEntry.claimed_until,
                Task.name,
                Task.status,
                Task.queued_at,
                func.now(),
            )
            .join(Task, Task.id == OutboxEntry.task_id)
            .where(OutboxEntry.id.in_(list(outbox_ids)))
        )
        return [tuple(row) for row in rows]


async def _wait_log(component: Component, text: str) -> None:
    """Wait for a component's log line; a minute: five processes start on a shared machine."""

    async def logged() -> bool:
        assert component.process.poll() is None, component.output()[-3000:]
        return text in component.output()

    await wait_for(logged, timeout_s=STARTUP_S, message=f"{component.module} to log {text!r}")


async def _wait_api(http: httpx.AsyncClient, api: Component) -> None:
    async def ready() -> bool:
        assert api.process.poll() is None, api.output()[-3000:]
        try:
            return (await http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(ready, timeout_s=STARTUP_S, message="the api to be ready")


async def _events(reader: SessionFactory) -> list[Event]:
    async with reader() as session:
        rows = await session.execute(
            select(TaskEvent.task_id, TaskEvent.at, TaskEvent.event, TaskEvent.detail).order_by(
                TaskEvent.id
            )
        )
        return [
            Event(task_id=task_id, at=at.timestamp(), event=event, detail=detail)
            for task_id, at, event, detail in rows
        ]


def _ended(story: Sequence[Event], attempt: int) -> bool:
    return any(e.event in RUN_ENDS and e.detail.get("attempt") == attempt for e in story)


async def _running_on(reader: SessionFactory, worker_id: str) -> dict[str, int]:
    """Attempts a worker started that nothing ended yet: task id -> attempt."""
    history: dict[str, list[Event]] = defaultdict(list)
    for event in await _events(reader):
        history[event.task_id].append(event)
    running: dict[str, int] = {}
    for task_id, story in history.items():
        starts = [e for e in story if e.event == EventKind.STARTED]
        if not starts or starts[-1].detail.get("worker") != worker_id:
            continue
        attempt = int(starts[-1].detail["attempt"])
        if not _ended(story, attempt):
            running[task_id] = attempt
    return running


async def _unended(reader: SessionFactory, attempts: dict[str, int]) -> set[str]:
    """The tasks of ``attempts`` whose attempt no event ended yet."""
    history: dict[str, list[Event]] = defaultdict(list)
    for event in await _events(reader):
        if event.task_id in attempts:
            history[event.task_id].append(event)
    return {t for t, attempt in attempts.items() if not _ended(history[t], attempt)}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_partition(
    scenario: str,
    database_url: str,
    reader: SessionFactory,
    writer: SessionFactory,
    host_b: Host,
    redis: RedisServer,
    forwarders: list[Forwarder],
    tmp_path: Path,
) -> None:
    cut = SCENARIOS[scenario]
    seed = int(os.environ.get("PARTITION_SEED") or time.time_ns() % 1_000_000)
    rng = random.Random(seed)
    print(f"\npartition seed={seed} scenario={scenario}")
    effects = tmp_path / "effects.log"
    api_port = free_port()
    to_database, to_redis = forwarders
    database_port, redis_port = to_database.listen[1], to_redis.listen[1]
    env_a = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis.url,
        "API_PORT": str(api_port),
        "LOG_LEVEL": "INFO",
        "RELAY_RATE": str(RATE),
        "RELAY_BURST": str(BURST),
        "RELAY_LIMITS": LIMITS,
        "RELAY_CLAIM_LEASE_S": str(RELAY_LEASE_S),
        "RECONCILE_INTERVAL_S": "0.5",
        "WORKER_LEASE_S": str(WORKER_LEASE_S),
        "WORKER_SHUTDOWN_GRACE_S": "1",
        SIDE_EFFECT_LOG_ENV: str(effects),
    }
    url_b = make_url(database_url).set(host=host_b.database.outer_address, port=database_port)
    env_b = {
        "DATABASE_URL": url_b.render_as_string(hide_password=False),
        "REDIS_URL": f"redis://{host_b.redis.outer_address}:{redis_port}/0",
    }
    requests = _requests(rng)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as http:
        with cluster(env=env_a, log_dir=tmp_path) as running:
            api = running.start("api")
            worker_a = running.start(SIDE_EFFECT_WORKER)
            worker_b = start_in(host_b, running, SIDE_EFFECT_WORKER, extra_env=env_b)
            await _wait_api(http, api)
            for worker in (worker_a, worker_b):
                await _wait_log(worker, "worker.ready")
            # B's relay first: it gets a head start on the backlog.
            relay_b = start_in(host_b, running, "relay", extra_env=env_b)
            await _wait_log(relay_b, "relay.started")
            relay_a = running.start("relay")
            await _wait_log(relay_a, "relay.started")
            started_at = time.time()
            task_ids = await _insert_directly(writer, requests)
            components = [api, worker_a, worker_b, relay_a, relay_b]

            def check_alive() -> None:
                for component in components:
                    if component.process.poll() is not None:
                        raise AssertionError(
                            f"{component.module} exited:\n{component.output()[-3000:]}"
                        )

            # Cut while B holds work: rows leased to its relay and, when Redis goes,
            # attempts on its worker (their takeover is what the test watches).
            relay_prefix, b_worker = _relay_prefix(relay_b), _worker_id(worker_b)

            async def b_holds_work() -> bool:
                check_alive()
                if not await _leased_to(reader, relay_prefix):
                    return False
                return not cut.redis or bool(await _running_on(reader, b_worker))

            cutting = [
                f for f, wanted in ((to_database, cut.database), (to_redis, cut.redis)) if wanted
            ]

            async def b_mid_claim() -> bool:
                """Hold B's traffic on the links to cut; keep holding it if B is mid-claim
                (it holds the claims' lock) with rows leased, else let it go and say no."""
                for forwarder in cutting:
                    await asyncio.to_thread(forwarder.hold)
                if await _holds_claim_lock(reader, to_database) and await _leased_to(
                    reader, relay_prefix
                ):
                    return True
                for forwarder in cutting:
                    await asyncio.to_thread(forwarder.release)
                return False

            # Cut while B holds work, in the middle of a claim: the worst moment.
            try:
                await wait_for(b_holds_work, timeout_s=HOLD_TIMEOUT_S, interval_s=0.01)
                await wait_for(b_mid_claim, timeout_s=HOLD_TIMEOUT_S, interval_s=0.02)
            except AssertionError:
                print("B held no lease, attempt or claim at once: cutting anyway")
                for forwarder in cutting:
                    await asyncio.to_thread(forwarder.hold)
            await asyncio.to_thread(host_b.cut, database=cut.database, redis=cut.redis)
            cut_at = time.time()
            held_lock = await _holds_claim_lock(reader, to_database)
            held_rows = await _leased_to(reader, relay_prefix)
            held_attempts = await _running_on(reader, b_worker)
            print(
                f"cut {scenario} at {cut_at - started_at:.2f}s: B held {len(held_rows)} "
                f"outbox lease(s), {len(held_attempts)} running attempt(s), "
                f"{'the' if held_lock else 'not the'} claims' lock"
            )

            # A takes over B's leased rows: each deleted, or leased to another relay.
            async def rows_taken_over() -> bool:
                still = await _leased_to(reader, relay_prefix)
                return not (set(still) & set(held_rows))

            try:
                await wait_for(
                    rows_taken_over,
                    timeout_s=TAKEOVER_S,
                    interval_s=0.1,
                    message="A to take over B's outbox leases",
                )
            except AssertionError as timed_out:
                raise AssertionError(f"{timed_out}: {await _rows(reader, held_rows)}") from None
            rows_taken_s = time.time() - cut_at
            attempts_taken_s = None
            if cut.redis and held_attempts:
                # B's in-progress leases lapse; A's worker gets the jobs and ends those
                # attempts (requeued, or failed when side-effecting).
                async def attempts_taken_over() -> bool:
                    return not await _unended(reader, held_attempts)

                await wait_for(
                    attempts_taken_over,
                    timeout_s=TAKEOVER_S,
                    interval_s=0.1,
                    message="A to end the attempts B's worker was running",
                )
                attempts_taken_s = time.time() - cut_at
            # While B is still away, A alone takes and dispatches new work.
            # At the top priority: ahead of the account's backlog, which A also works off.
            during = [
                (f"{GREETING}?priority=9", {"name": f"during-{i}"}) for i in range(DURING_CUT)
            ]
            during_ids = list(await asyncio.gather(*(_post(http, n, b) for n, b in during)))
            task_ids += during_ids

            async def during_dispatched() -> bool:
                async with reader() as session:
                    waiting = await session.scalar(
                        select(func.count())
                        .select_from(Task)
                        .where(Task.id.in_(during_ids), Task.status == TaskStatus.PENDING)
                    )
                return waiting == 0

            await wait_for(
                during_dispatched,
                timeout_s=max(0.1, cut_at + CUT_S - time.time()),
                interval_s=0.1,
                message="A to dispatch the work submitted while B is cut off",
            )
            dispatched_s = time.time() - cut_at
            await asyncio.sleep(max(0.0, cut_at + CUT_S - time.time()))
            check_alive()
            await asyncio.to_thread(host_b.heal)
            # What B sent as the link went down arrives now, as TCP would retransmit it.
            for forwarder in cutting:
                await asyncio.to_thread(forwarder.release)
            healed_at = time.time()
            print(
                f"A dispatched the {DURING_CUT} submitted during the cut by "
                f"{dispatched_s:.2f}s; "
                f"healed after {healed_at - cut_at:.2f}s; A took B's leases in "
                f"{rows_taken_s:.2f}s, B's attempts in "
                + ("n/a" if attempts_taken_s is None else f"{attempts_taken_s:.2f}s")
            )

            async def settled() -> bool:
                check_alive()
                async with reader() as session:
                    open_tasks = await session.scalar(
                        select(func.count())
                        .select_from(Task)
                        .where(Task.status.not_in(list(TERMINAL_STATUSES)))
                    )
                    outbox = await session.scalar(select(func.count()).select_from(OutboxEntry))
                return open_tasks == 0 and outbox == 0

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
            # B came back and kept working: it, too, is alive at the end.
            check_alive()
            logs_b = worker_b.output() + relay_b.output()

    _check_guarantees(
        task_ids=task_ids,
        tasks=await _tasks(reader),
        events=await _events(reader),
        effects=effects,
    )
    print(f"settled {settled_s:.2f}s after the first submission; {len(task_ids)} tasks")
    assert "Traceback" not in logs_b, logs_b[-3000:]


async def _tasks(reader: SessionFactory) -> dict[str, tuple[str, str, str | None]]:
    async with reader() as session:
        return {
            task_id: (name, status, error)
            for task_id, name, status, error in await session.execute(
                select(Task.id, Task.name, Task.status, Task.error)
            )
        }


def _check_guarantees(
    *,
    task_ids: Sequence[str],
    tasks: dict[str, tuple[str, str, str | None]],
    events: Sequence[Event],
    effects: Path,
) -> None:
    """The chaos soak's checks of guarantees 2-4, from the audit trail and the effects."""
    history: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        history[event.task_id].append(event)
    effect_lines = effects.read_text().splitlines() if effects.exists() else []
    matches = [EFFECT_LINE.fullmatch(line) for line in effect_lines]
    assert all(matches), effect_lines[:5]
    effect_starts = Counter(match.group(1) for match in matches if match)

    # Guarantee 2: every accepted task terminal, exactly once.
    assert set(task_ids) == set(tasks)
    assert len(tasks) == sum(MIX.values()) + DURING_CUT
    not_final = {t: s for t, (_, s, _) in tasks.items() if s not in TERMINAL_STATUSES}
    assert not not_final, not_final
    for task_id, story in history.items():
        kinds = Counter(e.event for e in story)
        assert kinds[EventKind.SUBMITTED] == 1, (task_id, story)
        assert 1 <= kinds[EventKind.QUEUED] <= 1 + kinds[EventKind.REQUEUED], (task_id, story)
        assert sum(kinds[k] for k in TERMINAL_STATUSES) == 1, (task_id, story)
        assert story[-1].event in TERMINAL_STATUSES, (task_id, story)
        # One attempt at a time: each start follows the end of the one before.
        open_attempt: int | None = None
        for index, event in enumerate(story):
            if event.event == EventKind.STARTED:
                assert open_attempt is None, ("two attempts at once", task_id, story)
                open_attempt = event.detail["attempt"]
            elif event.event in RUN_ENDS and event.detail.get("attempt") == open_attempt:
                open_attempt = None
            elif event.event == EventKind.REQUEUED and not _next_after(
                story, index, EventKind.QUEUED
            ):
                assert story[-1].event in TERMINAL_STATUSES, story

    # Guarantee 4: retriable tasks succeeded, side-effecting ones started at most once.
    by_name: dict[str, set[str]] = defaultdict(set)
    for task_id, (name, _, _) in tasks.items():
        by_name[name].add(task_id)
    failed_retriable = {
        t: (n, s, e) for t, (n, s, e) in tasks.items() if n in RETRIABLE and s != "succeeded"
    }
    assert not failed_retriable, failed_retriable
    twice = {task_id: count for task_id, count in effect_starts.items() if count > 1}
    assert not twice, twice
    for task_id in by_name[MISSILE]:
        _, status, error = tasks[task_id]
        if status == TaskStatus.SUCCEEDED:
            assert effect_starts[task_id] == 1, (task_id, history[task_id])
        else:
            assert status == TaskStatus.FAILED, (task_id, status)
            assert error is not None, task_id
            assert UNKNOWN_OUTCOME.search(error), (task_id, error)

    # Guarantee 3: the rates and the in-flight cap, over the queued events.
    queued = [e for e in events if e.event == EventKind.QUEUED]
    worst_cluster = max_in_window([e.at for e in queued], 1.0)
    sleeps = by_name[SLEEP]
    worst_sleep = max_in_window([e.at for e in queued if e.task_id in sleeps], 1.0)
    missile_events = [e for e in events if e.task_id in by_name[MISSILE]]
    peak_running = _peak(missile_events, starts=EventKind.STARTED, ends=frozenset(RUN_ENDS))
    peak_inflight = _peak(missile_events, starts=EventKind.QUEUED, ends=INFLIGHT_ENDS)
    failed_missiles = sum(1 for t in by_name[MISSILE] if tasks[t][1] == TaskStatus.FAILED)
    print(
        f"worst 1s window: cluster {worst_cluster} (limit {RATE + BURST}), "
        f"{SLEEP} {worst_sleep} (limit {SLEEP_RATE + SLEEP_BURST}); missiles peak running "
        f"{peak_running}, in flight {peak_inflight} (cap {MISSILE_INFLIGHT}); "
        f"{failed_missiles} of {len(by_name[MISSILE])} missiles failed, outcome unknown"
    )
    assert worst_cluster <= RATE + BURST
    assert max_in_window([e.at for e in queued], 0.5) <= RATE * 0.5 + BURST
    assert worst_sleep <= SLEEP_RATE + SLEEP_BURST
    assert peak_running <= MISSILE_INFLIGHT
    assert peak_inflight <= MISSILE_INFLIGHT
