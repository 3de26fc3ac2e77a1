"""``throttler submit --file``: stream a JSONL file through ``POST /tasks`` in batches.

The file is read line by line (never whole). A line without ``idempotency_key`` gets one
derived from its line number and its bytes, so a rerun of the same file (after a crash,
a 503 or Ctrl-C) replays what was already written and creates nothing new.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.progress import Progress

from cli.client import API, ApiError, detail, headers

BATCH = 1000
# Answers worth retrying with the same batch and keys: the write did not happen.
RETRIABLE = frozenset({429, 502, 503, 504})
# Tasks long-polled at once with --wait.
WATCHERS = 64
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class Batch:
    first_line: int
    lines: list[int]
    # The lines as sent, each a JSON object with its idempotency key: the request body
    # is joined from these bytes, not encoded again (half the CLI's CPU at 10,000/s).
    items: list[bytes]


@dataclass(slots=True)
class Outcome:
    task_ids: list[str] = field(default_factory=list)
    submitted: int = 0
    replayed: int = 0
    failed: int = 0
    finished: int = 0


def line_key(number: int, raw: bytes) -> str:
    """The same line at the same place in a rerun gets the same key."""
    return "jsonl-" + hashlib.sha256(b"%d:" % number + raw).hexdigest()[:40]


def batches(path: Path, size: int = BATCH) -> Iterator[Batch]:
    items: list[bytes] = []
    lines: list[int] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            stripped = raw.strip()
            if not stripped:
                continue
            try:
                item = json.loads(stripped)
            except ValueError as error:
                raise ApiError(f"{path}:{number}: not JSON: {error}") from error
            if not isinstance(item, dict):
                raise ApiError(f"{path}:{number}: not a JSON object")
            if "idempotency_key" in item:
                items.append(stripped)
            elif item:
                key = line_key(number, stripped)
                items.append(b'%s,"idempotency_key":"%s"}' % (stripped[:-1], key.encode()))
            else:
                items.append(json.dumps({"idempotency_key": line_key(number, stripped)}).encode())
            lines.append(number)
            if len(items) == size:
                yield Batch(first_line=lines[0], lines=lines, items=items)
                items, lines = [], []
    if items:
        yield Batch(first_line=lines[0], lines=lines, items=items)


def _bad_item(path: Path, batch: Batch, response: httpx.Response) -> str:
    """A 422's location ``["body", "tasks", i, ...]`` as the file's line and field."""
    try:
        errors = response.json().get("detail")
        loc = errors[0]["loc"]
        index = int(loc[2])
        where = ".".join(str(part) for part in loc[3:]) or "item"
        return f"{path}:{batch.lines[index]}: {where}: {errors[0]['msg']}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return f"{path}: lines {batch.first_line}-{batch.lines[-1]}: {detail(response)}"


async def _post(
    http: httpx.AsyncClient,
    path: Path,
    batch: Batch,
    *,
    retry_for_s: float,
    ids: bool,
    notice: Callable[[str], None],
) -> tuple[list[str], bool]:
    """Post one batch until it is written; a 503 or a refused connection is retried."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for_s
    pause = 0.2
    body = b'{"tasks":[' + b",".join(batch.items) + b"]}"
    while True:
        try:
            response = await http.post(
                "/tasks", content=body, headers={"Content-Type": "application/json"}
            )
        except httpx.TransportError as error:
            problem = f"cannot reach the API at {http.base_url}: {error}"
        else:
            if response.status_code in (200, 202):
                # The 1,000 views are decoded only when --wait needs their ids.
                task_ids = [task["task_id"] for task in response.json()["tasks"]] if ids else []
                return task_ids, response.status_code == 200
            if response.status_code == 422:
                raise ApiError(_bad_item(path, batch, response))
            if response.status_code not in RETRIABLE:
                raise ApiError(f"POST /tasks: HTTP {response.status_code}: {detail(response)}")
            problem = f"HTTP {response.status_code}: {detail(response)}"
        if loop.time() + pause > deadline:
            raise ApiError(f"gave up after {retry_for_s:g}s: {problem}")
        notice(f"lines {batch.first_line}-{batch.lines[-1]}: retrying in {pause:g}s: {problem}")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 5.0)


async def _wait_one(http: httpx.AsyncClient, task_id: str) -> str:
    while True:
        try:
            response = await http.get(f"/task/result/{task_id}", params={"wait": 30})
        except httpx.TransportError:
            await asyncio.sleep(1)
            continue
        if response.status_code >= 400 and response.status_code not in RETRIABLE:
            raise ApiError(f"GET result {task_id}: HTTP {response.status_code}")
        if response.status_code < 400:
            status: str = response.json()["status"]
            if status in TERMINAL:
                return status


async def submit_file(
    *,
    url: str,
    key: str | None,
    path: Path,
    wait: bool,
    concurrency: int,
    retry_for_s: float,
    progress: Progress,
) -> Outcome:
    outcome = Outcome()
    limits = httpx.Limits(max_connections=max(concurrency, 64))
    async with httpx.AsyncClient(
        base_url=url.rstrip("/") + API, headers=headers(key), timeout=60, limits=limits
    ) as http:
        sent = progress.add_task("submitted", total=None)
        done = progress.add_task("finished", total=None, visible=wait)
        slots = asyncio.Semaphore(concurrency)
        # --wait: a fixed pool of long-polls takes ids as batches land (not one coroutine
        # per task: a file may hold millions); None tells a watcher the file is done.
        to_watch: asyncio.Queue[str | None] = asyncio.Queue()

        async def watch() -> None:
            while (task_id := await to_watch.get()) is not None:
                status = await _wait_one(http, task_id)
                outcome.finished += 1
                outcome.failed += status != "succeeded"
                progress.advance(done)

        async def send(batch: Batch) -> None:
            try:
                ids, replayed = await _post(
                    http,
                    path,
                    batch,
                    retry_for_s=retry_for_s,
                    ids=wait,
                    notice=progress.console.print,
                )
            finally:
                slots.release()
            outcome.submitted += len(batch.items)
            if replayed:
                outcome.replayed += len(batch.items)
            progress.advance(sent, len(batch.items))
            if wait:
                outcome.task_ids.extend(ids)
                progress.update(done, total=len(outcome.task_ids))
                for task_id in ids:
                    to_watch.put_nowait(task_id)

        async with asyncio.TaskGroup() as group:
            watchers = [group.create_task(watch()) for _ in range(WATCHERS if wait else 0)]
            async with asyncio.TaskGroup() as senders:
                for batch in batches(path):
                    await slots.acquire()
                    senders.create_task(send(batch))
            progress.update(sent, total=outcome.submitted)
            for _ in watchers:
                to_watch.put_nowait(None)
    return outcome
