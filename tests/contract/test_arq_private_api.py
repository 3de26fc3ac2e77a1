"""Every part of ARQ our overrides touch, beyond its documented API, still has our shape.

``worker/leases.py`` (LeasedWorker: ``start_jobs`` replaced, leases renewed),
``worker/pipelines.py`` (ARQ's job transactions batched, run through leases' _JobView),
``worker/app.py`` and ``worker/service.py`` (closing and draining a worker), and
``relay/enqueue.py`` (BatchEnqueuer: ARQ's enqueue in Lua) read and write ARQ's
internals. Each check below names the attribute it guards and where we rely on it, so a
failure after an ARQ upgrade says what to revisit (see the README, "Upgrading ARQ").
The behavioural twin of these checks is in test_arq_enqueue.py and test_arq_pickup.py.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import textwrap
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import arq.constants
import arq.jobs
import arq.utils
import pytest
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker

MAX_JOBS = 3
LEASES = "worker/leases.py"
ENQUEUE = "relay/enqueue.py"
SERVICE = "worker/service.py, worker/app.py"
PIPELINES = "worker/pipelines.py, worker/leases.py (_JobView)"


async def noop(ctx: dict[str, Any]) -> None:
    return None


# A check returns None when ARQ still has the shape, else what changed.
Check = Callable[[Worker, ArqRedis], Awaitable[str | None]]


@dataclass(frozen=True, kw_only=True, slots=True)
class Expectation:
    name: str  # the ARQ attribute, as our code spells it
    used_by: str
    check: Check


def _parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def _method(owner: type, name: str, parameters: list[str]) -> Check:
    async def check(worker: Worker, redis: ArqRedis) -> str | None:
        function = getattr(owner, name, None)
        if function is None:
            return "is gone"
        if not inspect.iscoroutinefunction(function):
            return "is no longer a coroutine function; we await it"
        if _parameters(function) != parameters:
            return f"takes {_parameters(function)}, we call it with {parameters}"
        return None

    return check


def _sync_method(owner: type, name: str, parameters: list[str]) -> Check:
    async def check(worker: Worker, redis: ArqRedis) -> str | None:
        function = getattr(owner, name, None)
        if function is None:
            return "is gone"
        if inspect.iscoroutinefunction(function):
            return "became a coroutine function; we call it synchronously"
        if _parameters(function) != parameters:
            return f"takes {_parameters(function)}, we call it with {parameters}"
        return None

    return check


def _attribute(name: str, kind: type | tuple[type, ...], value: Any = ...) -> Check:
    async def check(worker: Worker, redis: ArqRedis) -> str | None:
        if not hasattr(worker, name):
            return "is gone from a new Worker"
        found = getattr(worker, name)
        if not isinstance(found, kind):
            return f"is a {type(found).__name__}, we use it as {kind}"
        if value is not ... and found != value:
            return f"starts as {found!r}, we expect {value!r}"
        return None

    return check


async def _semaphore(worker: Worker, redis: ArqRedis) -> str | None:
    # LeasedWorker.start_jobs takes a slot per job without waiting: the semaphore must have
    # max_jobs + 1 places, as ARQ's start_jobs assumes too.
    sem = getattr(worker, "sem", None)
    if not isinstance(sem, asyncio.BoundedSemaphore):
        return f"is {type(sem).__name__}, not an asyncio.BoundedSemaphore"
    for taken in range(MAX_JOBS + 1):
        if sem.locked():
            return f"has {taken} places for max_jobs={MAX_JOBS}; we expect max_jobs + 1"
        await sem.acquire()
    if not sem.locked():
        return f"has more than max_jobs + 1 places for max_jobs={MAX_JOBS}"
    for _ in range(MAX_JOBS + 1):
        sem.release()
    return None


async def _poll_calls_start_jobs(worker: Worker, redis: ArqRedis) -> str | None:
    # Our pickup replaces start_jobs; it runs only if the poll loop still calls it, with
    # the due job ids (bytes) read from the queue.
    source = inspect.getsource(Worker._poll_iteration)
    if "await self.start_jobs(job_ids)" not in source:
        return "no longer calls self.start_jobs(job_ids): LeasedWorker's pickup would not run"
    if "self.job_counter < self.max_jobs" not in source:
        return "no longer checks job_counter < max_jobs before reading the queue"
    return None


async def _release_callback(worker: Worker, redis: ArqRedis) -> str | None:
    # LeasedWorker gives its slot back through this and extends it to wake start_jobs.
    before = worker.job_counter
    await worker.sem.acquire()
    worker.job_counter += 1
    worker._release_sem_dec_counter_on_complete()
    if worker.job_counter != before:
        return "no longer decrements job_counter"
    if worker.sem.locked():
        return "no longer releases sem"
    return None


async def _in_progress_ttl(worker: Worker, redis: ArqRedis) -> str | None:
    # LeasedWorker sets this after Worker.__init__ to its lease, on the premise that ARQ
    # reads it only to set the in-progress key's TTL at pickup (in start_jobs).
    value = getattr(worker, "in_progress_timeout_s", None)
    if not isinstance(value, int | float):
        return f"is {value!r}, not seconds"
    readers = _methods_reading(Worker, "in_progress_timeout_s")
    if readers != {"__init__", "start_jobs"}:
        return f"is read by {sorted(readers)}; we expect only __init__ and start_jobs"
    return None


def _methods_reading(owner: type, attribute: str) -> set[str]:
    """The methods of ``owner`` whose code names ``self.<attribute>``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(owner)))
    [cls] = tree.body
    assert isinstance(cls, ast.ClassDef)
    return {
        method.name
        for method in cls.body
        if isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef)
        and any(
            isinstance(node, ast.Attribute) and node.attr == attribute for node in ast.walk(method)
        )
    }


def _transactions_batchable(name: str) -> Check:
    # worker.pipelines cuts each job's share out of one batched transaction: ARQ must
    # queue a transaction's commands with no await in between, then await execute() once,
    # and use the pool for nothing else in the method (run_job aside: its rare setex).
    async def check(worker: Worker, redis: ArqRedis) -> str | None:
        tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(Worker, name))))
        blocks = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.AsyncWith)
            and ast.unparse(node.items[0].context_expr) == "self.pool.pipeline(transaction=True)"
        ]
        if not blocks:
            return "opens no self.pool.pipeline(transaction=True) any more"
        for block in blocks:
            target = block.items[0].optional_vars
            execute = f"{ast.unparse(target)}.execute()" if target is not None else None
            awaits = [node for node in ast.walk(block) if isinstance(node, ast.Await)]
            if (
                target is None
                or not awaits
                or any(ast.unparse(node.value) != execute for node in awaits)
            ):
                return "awaits something other than execute() inside its transaction"
            if not _nothing_queued_after_execute(block.body, ast.unparse(target)):
                return "queues commands after execute() in its transaction"
        pool_uses = {
            ast.unparse(node)
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and ast.unparse(node.value) == "self.pool"
        }
        if not pool_uses <= {"self.pool.pipeline", "self.pool.setex"}:
            return f"uses {sorted(pool_uses)} of the pool; we batch only its transactions"
        return None

    return check


def _nothing_queued_after_execute(body: list[ast.stmt], pipe: str) -> bool:
    """Whether, in ``body`` and the bodies within it, no statement after one that awaits
    names the pipeline ``pipe`` (queues a command after its execute)."""
    awaited = False
    for statement in body:
        names = {node.id for node in ast.walk(statement) if isinstance(node, ast.Name)}
        if awaited and pipe in names:
            return False
        awaited = awaited or any(isinstance(node, ast.Await) for node in ast.walk(statement))
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(statement, field, None)
            if isinstance(inner, list) and inner and not _nothing_queued_after_execute(inner, pipe):
                return False
    return True


async def _run_job_finishes_through_self(worker: Worker, redis: ArqRedis) -> str | None:
    # _JobView binds ARQ's finish_job and finish_failed_job to itself: run_job must call
    # them as methods of self, so they see the view's batching pool.
    source = inspect.getsource(Worker.run_job)
    for call in ("self.finish_job(", "self.finish_failed_job("):
        if call not in source:
            return f"no longer calls {call}...): its transaction would not be batched"
    return None


async def _serialize_job(worker: Worker, redis: ArqRedis) -> str | None:
    expected = ["function_name", "args", "kwargs", "job_try", "enqueue_time_ms", "serializer"]
    found = _parameters(arq.jobs.serialize_job)
    if found != expected:
        return f"takes {found}, we call it with {expected}"
    return None


async def _enqueue_job(worker: Worker, redis: ArqRedis) -> str | None:
    # BatchEnqueuer does what enqueue_job does for these options (and only these).
    expected = {"function", "_job_id", "_defer_until", "_expires"}
    missing = expected - set(_parameters(ArqRedis.enqueue_job))
    if missing:
        return f"lost {sorted(missing)}"
    source = inspect.getsource(ArqRedis.enqueue_job)
    for step in (
        "pipe.exists(job_key, result_key_prefix + job_id)",
        "score - enqueue_time_ms + self.expires_extra_ms",
        "pipe.psetex(job_key, expires_ms, job)",
        "pipe.zadd(_queue_name, {job_id: score})",
    ):
        if step not in source:
            return f"no longer does {step!r}: compare relay/enqueue.py's _ENQUEUE_LUA with it"
    return None


def _pool(name: str, kind: type | tuple[type, ...]) -> Check:
    async def check(worker: Worker, redis: ArqRedis) -> str | None:
        if not hasattr(redis, name):
            return "is gone from ArqRedis"
        found = getattr(redis, name)
        if not isinstance(found, kind):
            return f"is {found!r}, we use it as {kind}"
        return None

    return check


async def _serializer(worker: Worker, redis: ArqRedis) -> str | None:
    # None (pickle) or a callable: passed on to serialize_job as ARQ does.
    if not hasattr(redis, "job_serializer"):
        return "is gone from ArqRedis"
    if redis.job_serializer is not None and not callable(redis.job_serializer):
        return f"is {redis.job_serializer!r}, not a serializer"
    return None


def _constant(name: str) -> Check:
    async def check(worker: Worker, redis: ArqRedis) -> str | None:
        found = getattr(arq.constants, name, None)
        if not isinstance(found, str) or not found:
            return f"is {found!r}, we import it as a key prefix or name"
        return None

    return check


def _function(module: Any, name: str, parameters: list[str]) -> Check:
    async def check(worker: Worker, redis: ArqRedis) -> str | None:
        found = getattr(module, name, None)
        if not callable(found):
            return "is gone"
        if _parameters(found) != parameters:
            return f"takes {_parameters(found)}, we call it with {parameters}"
        return None

    return check


EXPECTATIONS = [
    # --- the pickup: LeasedWorker.start_jobs and the leases ---
    Expectation(
        name="Worker.start_jobs",
        used_by=LEASES,
        check=_method(Worker, "start_jobs", ["self", "job_ids"]),
    ),
    Expectation(name="Worker._poll_iteration", used_by=LEASES, check=_poll_calls_start_jobs),
    Expectation(
        name="Worker.run_job",
        used_by=LEASES,
        check=_method(Worker, "run_job", ["self", "job_id", "score"]),
    ),
    Expectation(name="Worker.main", used_by=LEASES, check=_method(Worker, "main", ["self"])),
    Expectation(
        name="Worker._release_sem_dec_counter_on_complete",
        used_by=LEASES,
        check=_release_callback,
    ),
    Expectation(
        name="Worker._release_sem_dec_counter_on_complete (signature)",
        used_by=LEASES,
        check=_sync_method(Worker, "_release_sem_dec_counter_on_complete", ["self"]),
    ),
    Expectation(name="Worker.sem", used_by=LEASES, check=_semaphore),
    Expectation(name="Worker.job_counter", used_by=LEASES, check=_attribute("job_counter", int, 0)),
    Expectation(
        name="Worker.max_jobs", used_by=LEASES, check=_attribute("max_jobs", int, MAX_JOBS)
    ),
    Expectation(
        name="Worker.tasks", used_by=f"{LEASES}, {SERVICE}", check=_attribute("tasks", dict, {})
    ),
    Expectation(
        name="Worker.allow_pick_jobs",
        used_by=f"{LEASES}, {SERVICE}",
        check=_attribute("allow_pick_jobs", bool, True),
    ),
    Expectation(
        name="Worker.loop", used_by=LEASES, check=_attribute("loop", asyncio.AbstractEventLoop)
    ),
    Expectation(name="Worker.queue_name", used_by=LEASES, check=_attribute("queue_name", str)),
    Expectation(
        name="Worker.pool", used_by=f"{LEASES}, {SERVICE}", check=_attribute("pool", ArqRedis)
    ),
    Expectation(name="Worker.in_progress_timeout_s", used_by=LEASES, check=_in_progress_ttl),
    Expectation(
        name="arq.constants.in_progress_key_prefix",
        used_by=LEASES,
        check=_constant("in_progress_key_prefix"),
    ),
    Expectation(
        name="arq.utils.timestamp_ms",
        used_by=f"{LEASES}, {ENQUEUE}",
        check=_function(arq.utils, "timestamp_ms", []),
    ),
    # --- the batched job transactions: worker.pipelines, run through _JobView ---
    Expectation(
        name="Worker.run_job (transactions)",
        used_by=PIPELINES,
        check=_transactions_batchable("run_job"),
    ),
    Expectation(
        name="Worker.run_job (finishes)", used_by=PIPELINES, check=_run_job_finishes_through_self
    ),
    Expectation(
        name="Worker.finish_job",
        used_by=PIPELINES,
        check=_method(
            Worker,
            "finish_job",
            [
                "self",
                "job_id",
                "finish",
                "result_data",
                "result_timeout_s",
                "keep_result_forever",
                "incr_score",
                "keep_in_progress",
            ],
        ),
    ),
    Expectation(
        name="Worker.finish_job (transaction)",
        used_by=PIPELINES,
        check=_transactions_batchable("finish_job"),
    ),
    Expectation(
        name="Worker.finish_failed_job",
        used_by=PIPELINES,
        check=_method(Worker, "finish_failed_job", ["self", "job_id", "result_data"]),
    ),
    Expectation(
        name="Worker.finish_failed_job (transaction)",
        used_by=PIPELINES,
        check=_transactions_batchable("finish_failed_job"),
    ),
    # --- stopping a worker (worker/service.py, worker/app.py) ---
    Expectation(
        name="Worker.main_task", used_by=SERVICE, check=_attribute("main_task", type(None), None)
    ),
    Expectation(name="Worker.close", used_by=SERVICE, check=_method(Worker, "close", ["self"])),
    Expectation(name="Worker.functions", used_by=SERVICE, check=_attribute("functions", dict)),
    Expectation(name="Worker.ctx", used_by=SERVICE, check=_attribute("ctx", dict)),
    Expectation(name="Worker.burst", used_by=SERVICE, check=_attribute("burst", bool, False)),
    Expectation(
        name="Worker.max_burst_jobs", used_by=SERVICE, check=_attribute("max_burst_jobs", int)
    ),
    # --- the enqueue: BatchEnqueuer ---
    Expectation(name="ArqRedis.enqueue_job", used_by=ENQUEUE, check=_enqueue_job),
    Expectation(name="arq.jobs.serialize_job", used_by=ENQUEUE, check=_serialize_job),
    Expectation(name="ArqRedis.job_serializer", used_by=ENQUEUE, check=_serializer),
    Expectation(
        name="ArqRedis.expires_extra_ms", used_by=ENQUEUE, check=_pool("expires_extra_ms", int)
    ),
    Expectation(
        name="ArqRedis.default_queue_name", used_by=ENQUEUE, check=_pool("default_queue_name", str)
    ),
    Expectation(
        name="arq.constants.job_key_prefix", used_by=ENQUEUE, check=_constant("job_key_prefix")
    ),
    Expectation(
        name="arq.constants.result_key_prefix",
        used_by=ENQUEUE,
        check=_constant("result_key_prefix"),
    ),
    Expectation(
        name="arq.utils.to_unix_ms",
        used_by=ENQUEUE,
        check=_function(arq.utils, "to_unix_ms", ["dt"]),
    ),
]


@pytest.mark.parametrize("expected", EXPECTATIONS, ids=[item.name for item in EXPECTATIONS])
async def test_arq_still_has_what_we_use(redis_url: str, expected: Expectation) -> None:
    settings = RedisSettings.from_dsn(redis_url)
    worker = Worker(
        functions=[noop], redis_settings=settings, handle_signals=False, max_jobs=MAX_JOBS
    )
    # The pool as Worker.main() makes it.
    worker._pool = await arq.connections.create_pool(settings)
    try:
        problem = await expected.check(worker, worker.pool)
    finally:
        await worker.pool.aclose()
    if problem is not None:
        pytest.fail(
            f"arq changed {expected.name}: {problem}. {expected.used_by} relies on it; "
            "see the README, 'Upgrading ARQ'.",
            pytrace=False,
        )
