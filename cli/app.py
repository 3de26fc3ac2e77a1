"""The ``throttler`` commands: each one call (or a loop of calls) to the REST API."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli import render
from cli.client import ApiError, Client
from cli.submit_file import Outcome, submit_file

console = Console()


@click.group()
@click.option(
    "--url",
    envvar="THROTTLER_URL",
    default="http://127.0.0.1:8000",
    show_default=True,
    show_envvar=True,
)
@click.option(
    "--key", envvar="THROTTLER_API_KEY", default=None, show_envvar=True, help="An API key (Bearer)."
)
@click.pass_context
def cli(ctx: click.Context, url: str, key: str | None) -> None:
    """Talk to an ARQ Task Throttler's REST API."""
    ctx.obj = Client(url, key)


def _client() -> Client:
    client = click.get_current_context().find_object(Client)
    assert client is not None  # the group's callback made it
    return client


def _json(value: Any) -> None:
    console.print_json(json.dumps(value, default=str))


@cli.command()
@click.argument("name", required=False)
@click.option("--input", "input_", default="{}", help="The task's input as JSON.")
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="Wait for every task; exit 1 if any did not succeed.")
@click.option("--concurrency", default=4, show_default=True, help="Batches in flight (--file).")
@click.option("--retry-for", default=300.0, show_default=True, help="Seconds to retry a 503.")
def submit(
    name: str | None,
    input_: str,
    file: Path | None,
    wait: bool,
    concurrency: int,
    retry_for: float,
) -> None:
    """Submit one task (NAME --input JSON) or every line of a JSONL file (--file)."""
    client = _client()
    if file is None:
        if name is None:
            raise click.UsageError("give NAME or --file")
        try:
            body = json.loads(input_)
        except ValueError as error:
            raise click.BadParameter(f"not JSON: {error}", param_hint="--input") from error
        task = client.call("POST", f"/task/{name}", json=body)
        if wait:
            while task["status"] not in ("succeeded", "failed", "cancelled"):
                task = client.call("GET", f"/task/result/{task['task_id']}", params={"wait": 30})
        _json(task)
        if wait and task["status"] != "succeeded":
            raise SystemExit(1)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    started = time.monotonic()
    with Progress(*columns, console=Console(stderr=True)) as progress:
        outcome = _run_unwrapped(
            submit_file(
                url=client.url,
                key=client.http.headers.get("Authorization", "").removeprefix("Bearer ") or None,
                path=file,
                wait=wait,
                concurrency=concurrency,
                retry_for_s=retry_for,
                progress=progress,
            )
        )
    elapsed = time.monotonic() - started
    total = outcome.submitted
    line = f"submitted {total} tasks ({outcome.replayed} replayed) in {elapsed:.1f}s"
    if wait:
        line += f"; {outcome.finished - outcome.failed} succeeded, {outcome.failed} did not"
    click.echo(line)
    if outcome.failed:
        raise SystemExit(1)


def _run_unwrapped(work: Coroutine[Any, Any, Outcome]) -> Outcome:
    """Run ``work``; a task group's ApiError is raised as itself, for one clear line."""
    try:
        return asyncio.run(work)
    except* ApiError as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):  # task groups nest
            first = first.exceptions[0]
        raise first from None


@cli.command()
@click.option("--status", multiple=True, help="Only these statuses (repeatable).")
@click.option("--name", default=None, help="Only this kind of task.")
@click.option("--limit", default=50, show_default=True, help="How many tasks to show.")
def tasks(status: tuple[str, ...], name: str | None, limit: int) -> None:
    """List tasks, newest first."""
    client = _client()
    shown: list[dict[str, Any]] = []
    params: dict[str, Any] = {"status": list(status)} if status else {}
    if name:
        params["name"] = name
    cursor: str | None = None
    while len(shown) < limit:
        page = client.call(
            "GET", "/tasks", params={**params, **({"cursor": cursor} if cursor else {})}
        )
        shown.extend(page["tasks"])
        cursor = page.get("next_cursor")
        if not cursor:
            break
    console.print(render.tasks_table(shown[:limit]))


@cli.command()
@click.argument("task_id")
def show(task_id: str) -> None:
    """A task's view and its timeline of events."""
    client = _client()
    console.print(render.view_table(client.call("GET", f"/tasks/{task_id}")))
    console.print(render.events_table(client.call("GET", f"/tasks/{task_id}/events")["events"]))


def _by_filter(
    path: str, status: str | None, name: str | None, params: dict[str, str] | None = None
) -> None:
    """Call a filter endpoint until nothing remains: each call takes a bounded slice."""
    body = {k: v for k, v in {"status": status, "name": name}.items() if v}
    count = skipped = 0
    while True:
        answer = _client().call("POST", path, json=body, params=params or {})
        count += answer["count"]
        skipped += answer.get("skipped", 0)
        if answer["remaining"] == 0 or answer["count"] == 0:
            break
    click.echo(f"{count} tasks" + (f", {skipped} skipped" if skipped else ""))


@cli.command()
@click.argument("task_id", required=False)
@click.option("--force", is_flag=True, help="Also a running side-effecting task.")
@click.option("--status", default=None, help="By filter: pending, queued or running.")
@click.option("--name", default=None, help="By filter: this kind of task.")
def cancel(task_id: str | None, force: bool, status: str | None, name: str | None) -> None:
    """Cancel one task (ID) or every task matching --status/--name."""
    params = {"force": "true"} if force else {}
    if task_id:
        _json(_client().call("POST", f"/tasks/{task_id}/cancel", params=params))
    elif status or name:
        _by_filter("/tasks/cancel", status, name, params)
    else:
        raise click.UsageError("give an ID or a filter (--status, --name)")


@cli.command()
@click.argument("task_id", required=False)
@click.option("--status", default=None, help="By filter: failed or cancelled.")
@click.option("--name", default=None, help="By filter: this kind of task.")
def retry(task_id: str | None, status: str | None, name: str | None) -> None:
    """Retry one task (ID) or every task matching --status/--name."""
    if task_id:
        _json(_client().call("POST", f"/tasks/{task_id}/retry"))
    elif status or name:
        _by_filter("/tasks/retry", status, name)
    else:
        raise click.UsageError("give an ID or a filter (--status, --name)")


@cli.command()
def limits() -> None:
    """The rules in force and the pauses."""
    console.print(render.limits_table(_client().call("GET", "/limits")["rules"]))


@cli.command()
@click.argument("scope")
@click.option("--rate", default=None, help="e.g. 5/s, 300/m.")
@click.option("--burst", type=int, default=None)
@click.option("--inflight", type=int, default=None)
def limit(scope: str, rate: str | None, burst: int | None, inflight: int | None) -> None:
    """Set the whole rule of SCOPE (cluster, task:NAME, host:H, ...)."""
    body = {k: v for k, v in {"rate": rate, "burst": burst, "inflight": inflight}.items() if v}
    _json(_client().call("PUT", f"/limits/{scope}", json=body))


@cli.command()
@click.argument("scope")
@click.option("--for", "for_s", type=float, default=None, help="Seconds.")
@click.option("--until", default=None, help="An ISO 8601 moment.")
def pause(scope: str, for_s: float | None, until: str | None) -> None:
    """Release nothing of SCOPE for a while."""
    if (for_s is None) == (until is None):
        raise click.UsageError("give exactly one of --for and --until")
    body = {"for_s": for_s} if for_s is not None else {"until": until}
    _json(_client().call("POST", f"/limits/{scope}/pause", json=body))


@cli.command()
@click.argument("scope")
def resume(scope: str) -> None:
    """End SCOPE's pause."""
    _json(_client().call("POST", f"/limits/{scope}/resume"))


@cli.command()
def nodes() -> None:
    """Every relay and worker, alive or recently dead."""
    console.print(render.nodes_table(_client().call("GET", "/nodes")))


def _top_view(client: Client) -> Group:
    status = client.call("GET", "/relay/status")
    parts: list[Any] = [
        render.totals_table(status),
        render.status_table(status),
        render.nodes_table(client.call("GET", "/nodes")),
    ]
    if status.get("note"):
        parts.append(f"[bold red]{status['note']}")
    return Group(*parts)


@cli.command()
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option("--interval", default=1.0, show_default=True)
def top(once: bool, interval: float) -> None:
    """A live terminal view: totals, limits with backlog and in flight, nodes."""
    client = _client()
    if once:
        console.print(_top_view(client))
        return
    with Live(_top_view(client), console=console, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(_top_view(client))
        except KeyboardInterrupt:
            pass


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ApiError as error:  # raised outside click's own handling (asyncio)
        error.show()
        raise SystemExit(error.exit_code) from None
