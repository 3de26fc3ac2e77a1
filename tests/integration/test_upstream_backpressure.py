"""Upstream backpressure: a 429/503 with Retry-After pauses the host's scope, and the task
runs again after the pause without spending a try; any task can do the same through the
kit (worker.taskkit.backpressure). A real HTTP server, a real relay and worker."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from sqlalchemy import select

from tests.integration.conftest import ApiClientFactory
from tests.integration.test_api_waiting import _configured, _submit, _until_view
from tests.integration.test_api_waiting import running_relay as waiting_relay
from tests.integration.worker_harness import (
    arq_pool,
    dispatch,
    fast_retries,
    load_task,
    running_relay,
    running_worker,
    wait_final,
)
from tests.support import wait_for
from throttler.catalog import GREETING, GreetingInput
from throttler.db import SessionFactory
from throttler.limits import LimitKey, Scope
from throttler.models import LimitChange, LimitOverride, Task, TaskEvent, utcnow
from throttler.settings import Settings
from throttler.store.limits import ChangeKind, ChangeReason, LimitStore
from worker.taskkit import Backpressure, Resources, RetriableTask, SideEffectingTask
from worker.tasks import DEFAULT_TASKS
from worker.tasks.greeting import GreetingOutput

BODY = b"fine now\n"
# Each path's first answer; every later request of the path gets 200.
FIRST_ANSWERS: dict[str, tuple[int, str | None]] = {
    "/429-seconds": (429, "2"),
    "/429-date": (429, "date+2"),
    "/429-bare": (429, None),
    "/429-junk": (429, "soon, please"),
    "/503-seconds": (503, "1"),
}


@dataclass
class PushBackServer:
    """A local HTTP server that pushes back the first request of each path."""

    port: int
    times: dict[str, list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str, *, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def hits(self, path: str) -> list[float]:
        with self.lock:
            return list(self.times.get(path, []))


def _handler(state: PushBackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                seen = state.times.setdefault(self.path, [])
                seen.append(time.time())
                first = len(seen) == 1
            answer = FIRST_ANSWERS.get(self.path)
            if first and answer is not None:
                status, retry_after = answer
                self.send_response(status)
                if retry_after == "date+2":
                    # Whole seconds: the pause ends 1 to 2 s from now.
                    self.send_header("Retry-After", formatdate(time.time() + 2, usegmt=True))
                elif retry_after is not None:
                    self.send_header("Retry-After", retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, format: str, *args: Any) -> None:
            """Keep test output quiet."""

    return Handler


@pytest.fixture
def server() -> Iterator[PushBackServer]:
    state = PushBackServer(port=0)
    http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = http.server_address[1]
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield state
    http.shutdown()
    http.server_close()
    thread.join()


@pytest.fixture
def trusted(settings: Settings) -> Settings:
    """The local server may be fetched; one try only, so a spent try would fail the task."""
    return fast_retries(
        settings, download_allow_private=True, worker_max_tries=1, upstream_default_pause_s=1.5
    )


async def _changes(sessions: SessionFactory) -> list[LimitChange]:
    async with sessions() as session:
        return list((await session.scalars(select(LimitChange).order_by(LimitChange.id))).all())


async def _paused_until(sessions: SessionFactory, scope: str) -> datetime | None:
    async with sessions() as session:
        row = await session.get(LimitOverride, scope)
    return None if row is None else row.paused_until


async def _retrying(sessions: SessionFactory, task_id: str) -> TaskEvent:
    async with sessions() as session:
        events = (
            await session.scalars(
                select(TaskEvent).where(TaskEvent.task_id == task_id, TaskEvent.event == "retrying")
            )
        ).all()
    assert len(events) == 1
    return events[0]


async def _retrying_detail(sessions: SessionFactory, task_id: str) -> dict[str, Any]:
    detail = (await _retrying(sessions, task_id)).detail
    assert isinstance(detail, dict)
    return detail


async def _download(
    settings: Settings, sessions: SessionFactory, url: str
) -> tuple[Task, list[LimitChange]]:
    async with (
        arq_pool(settings) as pool,
        running_relay(settings, sessions, pool),
        running_worker(settings),
    ):
        task_id = await dispatch(sessions, pool, settings, name="download", payload={"url": url})
        task = await wait_final(sessions, task_id)
    return task, await _changes(sessions)


def _gap_s(server: PushBackServer, path: str) -> float:
    hits = server.hits(path)
    assert len(hits) == 2, hits
    return hits[1] - hits[0]


async def _check_pushed_back(
    sessions: SessionFactory,
    task: Task,
    changes: list[LimitChange],
    *,
    pause_s: float,
    tolerance_s: float = 0.3,
) -> None:
    """One pause of host:127.0.0.1 by the task, about ``pause_s`` long; the task succeeded
    on its second attempt, that push-back having spent no try."""
    assert task.status == "succeeded", task.error
    assert (task.attempts, task.tries_base) == (2, 1)
    assert len(changes) == 1
    change = changes[0]
    assert (change.scope, change.change, change.reason, change.by) == (
        "host:127.0.0.1",
        "pause",
        "upstream",
        task.id,
    )
    until = await _paused_until(sessions, "host:127.0.0.1")
    assert until is not None
    assert change.after is not None
    assert change.after["paused_until"] == until.isoformat()
    assert abs((until - change.at).total_seconds() - pause_s) < tolerance_s
    retrying = await _retrying(sessions, task.id)
    assert retrying.detail["reason"] == "upstream"
    # The task went back to the outbox with run_at (the event's moment + defer_s) at the
    # pause's end.
    assert retrying.at + timedelta(seconds=retrying.detail["defer_s"]) == until


async def test_429_with_retry_after_seconds_pauses_the_host_and_spends_no_try(
    trusted: Settings, sessions: SessionFactory, server: PushBackServer
) -> None:
    task, changes = await _download(trusted, sessions, server.url("/429-seconds"))

    await _check_pushed_back(sessions, task, changes, pause_s=2.0)
    # The host got no request during the pause.
    assert _gap_s(server, "/429-seconds") >= 1.9


async def test_429_with_an_http_date(
    trusted: Settings, sessions: SessionFactory, server: PushBackServer
) -> None:
    task, changes = await _download(trusted, sessions, server.url("/429-date"))

    # An HTTP-date has whole seconds: the pause ends 1 to 2 s after the answer.
    await _check_pushed_back(sessions, task, changes, pause_s=1.5, tolerance_s=0.75)
    assert _gap_s(server, "/429-date") >= 0.9


@pytest.mark.parametrize("path", ["/429-bare", "/429-junk"])
async def test_missing_or_invalid_retry_after_means_the_default_pause(
    trusted: Settings, sessions: SessionFactory, server: PushBackServer, path: str
) -> None:
    task, changes = await _download(trusted, sessions, server.url(path))

    await _check_pushed_back(sessions, task, changes, pause_s=trusted.upstream_default_pause_s)
    assert _gap_s(server, path) >= trusted.upstream_default_pause_s - 0.1


async def test_503_with_retry_after_pauses_the_same_way(
    trusted: Settings, sessions: SessionFactory, server: PushBackServer
) -> None:
    task, changes = await _download(trusted, sessions, server.url("/503-seconds"))

    await _check_pushed_back(sessions, task, changes, pause_s=1.0)
    assert _gap_s(server, "/503-seconds") >= 0.9


async def test_retry_after_is_clamped_to_the_maximum(
    trusted: Settings, sessions: SessionFactory, server: PushBackServer
) -> None:
    clamped = trusted.model_copy(update={"upstream_max_pause_s": 0.5})

    task, changes = await _download(clamped, sessions, server.url("/429-seconds"))

    await _check_pushed_back(sessions, task, changes, pause_s=0.5)


async def test_other_hosts_keep_going_during_the_pause(
    trusted: Settings, sessions: SessionFactory, server: PushBackServer
) -> None:
    async with (
        arq_pool(trusted) as pool,
        running_relay(trusted, sessions, pool),
        running_worker(trusted),
    ):
        pushed = await dispatch(
            sessions, pool, trusted, name="download", payload={"url": server.url("/429-seconds")}
        )
        await wait_for(lambda: _changes(sessions), message="the upstream pause")
        # Another host key (a name) for the same server: not paused.
        other = await dispatch(
            sessions,
            pool,
            trusted,
            name="download",
            payload={"url": server.url("/other", host="localhost")},
        )
        done = await wait_final(sessions, other)
        pushed_task = await load_task(sessions, pushed)
        assert done.status == "succeeded"
        # Finished while the paused host was still waiting for its second request.
        assert pushed_task.status == "pending"
        assert len(server.hits("/429-seconds")) == 1
        assert (await wait_final(sessions, pushed)).status == "succeeded"
    assert [change.scope for change in await _changes(sessions)] == ["host:127.0.0.1"]


async def test_an_upstream_pause_never_shortens_a_longer_one(
    settings: Settings, sessions: SessionFactory
) -> None:
    """The store's own change (as the API uses it): upstream only extends; an admin sets."""
    limits = LimitStore(sessions.kw["bind"])
    host = LimitKey(scope=Scope.HOST, value="partner.example")
    now = utcnow()

    async def pause(until: datetime, reason: ChangeReason) -> datetime | None:
        answer = await limits.change(
            ChangeKind.PAUSE, key=host, by="t", now=now, paused_until=until, reason=reason
        )
        assert answer.after is not None
        return answer.after.paused_until

    long, short = now + timedelta(seconds=60), now + timedelta(seconds=2)
    assert await pause(long, ChangeReason.UPSTREAM) == long
    assert await pause(short, ChangeReason.UPSTREAM) == long
    assert await _paused_until(sessions, "host:partner.example") == long
    assert await pause(now + timedelta(seconds=90), ChangeReason.UPSTREAM) == now + timedelta(
        seconds=90
    )
    assert await pause(short, ChangeReason.API) == short
    assert [c.reason for c in await _changes(sessions)] == ["upstream"] * 3 + ["api"]


async def test_a_download_released_before_the_pause_waits_it_out(
    trusted: Settings, sessions: SessionFactory, server: PushBackServer
) -> None:
    """A download already in ARQ when its host is paused does not reach the host during
    the pause: it goes back to the outbox until the end, no try spent, nothing recorded."""
    async with (
        arq_pool(trusted) as pool,
        running_relay(trusted, sessions, pool),
        running_worker(trusted),
    ):
        first = await dispatch(
            sessions, pool, trusted, name="download", payload={"url": server.url("/429-seconds")}
        )
        await wait_for(lambda: _changes(sessions), message="the pause")
        until = await _paused_until(sessions, "host:127.0.0.1")
        assert until is not None
        # Dispatched straight to the worker, as a relay released it just before the pause.
        second = await dispatch(
            sessions, pool, trusted, name="download", payload={"url": server.url("/file")}
        )
        tasks = [await wait_final(sessions, task_id) for task_id in (first, second)]
    assert [task.status for task in tasks] == ["succeeded", "succeeded"]
    assert (tasks[1].attempts, tasks[1].tries_base) == (2, 1)
    hits = server.hits("/file")
    assert len(hits) == 1
    assert hits[0] >= until.timestamp() - 0.05
    assert len(await _changes(sessions)) == 1
    detail = await _retrying_detail(sessions, second)
    assert detail["reason"] == "upstream"
    assert "ScopePaused" in detail["error"]


class PushesBackOnce(RetriableTask[GreetingInput, GreetingOutput], spec=GREETING):
    """Ask for a pause of the scope named in the input on the first call, then greet."""

    output_model = GreetingOutput
    calls: ClassVar[list[float]] = []

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        self.calls.append(time.monotonic())
        if len(self.calls) == 1:
            raise Backpressure(params.name, retry_after_s=1.0, detail="partner API said wait")
        return GreetingOutput(message=f"Hello, {params.name}!")


async def test_any_task_can_push_back_through_the_kit(
    trusted: Settings, sessions: SessionFactory
) -> None:
    PushesBackOnce.calls.clear()
    async with (
        arq_pool(trusted) as pool,
        running_relay(trusted, sessions, pool),
        running_worker(trusted, tasks=[PushesBackOnce, *DEFAULT_TASKS[1:]]),
    ):
        task_id = await dispatch(
            sessions, pool, trusted, name="greeting", payload={"name": "host:partner.example"}
        )
        task = await wait_final(sessions, task_id)

    assert task.status == "succeeded", task.error
    assert (task.attempts, task.tries_base) == (2, 1)
    changes = await _changes(sessions)
    assert [(c.scope, c.change, c.reason, c.by) for c in changes] == [
        ("host:partner.example", "pause", "upstream", task_id)
    ]
    assert PushesBackOnce.calls[1] - PushesBackOnce.calls[0] >= 0.9


async def test_a_task_naming_no_scope_fails(trusted: Settings, sessions: SessionFactory) -> None:
    PushesBackOnce.calls.clear()
    async with (
        arq_pool(trusted) as pool,
        running_relay(trusted, sessions, pool),
        running_worker(trusted, tasks=[PushesBackOnce, *DEFAULT_TASKS[1:]]),
    ):
        task_id = await dispatch(
            sessions, pool, trusted, name="greeting", payload={"name": "planet:mars"}
        )
        task = await wait_final(sessions, task_id)

    assert task.status == "failed"
    assert task.error is not None
    assert "Backpressure names no scope" in task.error
    assert await _changes(sessions) == []


async def test_past_the_cap_a_push_back_spends_a_try(
    trusted: Settings, sessions: SessionFactory, server: PushBackServer
) -> None:
    capped = trusted.model_copy(update={"upstream_max_pushbacks": 1, "upstream_max_pause_s": 0.2})

    task, changes = await _download(capped, sessions, server.url("/429-seconds"))

    # The pause is still recorded, but the one try is spent: the task fails.
    assert task.status == "failed"
    assert task.error is not None
    assert "HTTP 429" in task.error
    assert (task.attempts, task.tries_base) == (1, 0)
    assert [change.reason for change in changes] == ["upstream"]


async def test_an_upstream_pause_shows_in_the_task_views(
    settings: Settings,
    sessions: SessionFactory,
    make_api_client: ApiClientFactory,
    server: PushBackServer,
) -> None:
    """Through the API and a relay's board: the host's other tasks wait ``paused``; the
    pushed-back task is ``scheduled`` until the pause's end."""
    configured = _configured(settings, download_allow_private=True, upstream_default_pause_s=20)
    async with (
        make_api_client(configured) as client,
        waiting_relay(configured),
        running_worker(configured),
    ):
        pushed = await _submit(client, "download", {"url": server.url("/429-bare")})
        await wait_for(lambda: _changes(sessions), message="the pause")
        until = await _paused_until(sessions, "host:127.0.0.1")
        assert until is not None
        held = await _submit(client, "download", {"url": server.url("/file")})
        view = await _until_view(client, held, waiting="paused", message="held by the pause")
        assert view["waiting"]["scope"] == "host:127.0.0.1"
        assert datetime.fromisoformat(view["waiting"]["until"]) == until
        view = await _until_view(client, pushed, waiting="scheduled", message="pushed back")
        assert datetime.fromisoformat(view["waiting"]["until"]) == until
        listed = (await client.get("/api/v1/limits")).json()["rules"]
        assert {"scope": "host:127.0.0.1", "paused_until": until} in [
            {"scope": rule["scope"], "paused_until": datetime.fromisoformat(rule["paused_until"])}
            for rule in listed
            if rule["paused_until"]
        ]
    assert server.hits("/file") == []


SIDE_EFFECTING_GREETING = dataclasses.replace(GREETING, side_effecting=True)


class SendsOnceAfterPushBack(
    SideEffectingTask[GreetingInput, GreetingOutput], spec=SIDE_EFFECTING_GREETING
):
    """A side-effecting task whose upstream refused the first call (nothing was done)."""

    output_model = GreetingOutput
    calls: ClassVar[int] = 0

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        type(self).calls += 1
        if type(self).calls == 1:
            raise Backpressure(params.name, retry_after_s=0.3)
        return GreetingOutput(message=f"Sent to {params.name}")


async def test_a_side_effecting_task_pushed_back_runs_again(
    trusted: Settings, sessions: SessionFactory
) -> None:
    """A push-back means the request was not done: run it again, as any other task."""
    SendsOnceAfterPushBack.calls = 0
    async with (
        arq_pool(trusted) as pool,
        running_relay(trusted, sessions, pool),
        running_worker(trusted, tasks=[SendsOnceAfterPushBack, *DEFAULT_TASKS[1:]]),
    ):
        task_id = await dispatch(
            sessions, pool, trusted, name="greeting", payload={"name": "account:default"}
        )
        task = await wait_final(sessions, task_id)

    assert task.status == "succeeded", task.error
    assert (task.attempts, task.tries_base) == (2, 1)
    assert SendsOnceAfterPushBack.calls == 2
