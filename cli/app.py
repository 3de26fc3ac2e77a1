"""The ``throttler`` commands: each one call (or a loop of calls) to the REST API."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cli import render
from cli.client import ApiError, Client
from cli.submit_file import Outcome, submit_file
from throttler.labels import GRAMMAR, is_label

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


def _label(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not is_label(value):
        raise click.BadParameter(
            f"{value!r} is not a label: give {GRAMMAR} (the API key goes before the "
            "command: throttler --key KEY cancel ...)"
        )
    return value


def _moment(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 time with a timezone, e.g. 2026-11-29T12:00:00Z"
        )
    # As the API reads it (a "T", seconds), whatever spelling fromisoformat took.
    return moment.isoformat()


def _filter_options(
    statuses: Sequence[str],
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The filter options cancel and retry share (the body of POST /tasks/cancel|retry)."""

    def add(command: Callable[..., None]) -> Callable[..., None]:
        for option in reversed(
            (
                click.option(
                    "--status",
                    type=click.Choice(statuses),
                    default=None,
                    help="By filter: only these (default: " + ", ".join(statuses) + ").",
                ),
                click.option("--name", default=None, help="By filter: this kind of task."),
                click.option(
                    "--key",
                    "label",
                    default=None,
                    callback=_label,
                    help="By filter: tasks carrying this label (prefix:value).",
                ),
                click.option(
                    "--created-before",
                    default=None,
                    callback=_moment,
                    help="By filter: tasks created before this ISO 8601 time with a timezone.",
                ),
            )
        ):
            command = option(command)
        return command

    return add


# Calls in a row that may take nothing while tasks still match (rows another transaction
# holds) before the command gives up.
STALLED_CALLS = 10


def _by_filter(path: str, body: dict[str, str], params: dict[str, str] | None = None) -> None:
    """Call a filter endpoint until nothing remains: each call takes a bounded slice."""
    if body.get("name") == "":
        raise click.BadParameter("must not be empty", param_hint="--name")
    count = skipped = stalled = 0
    while True:
        answer = _client().call("POST", path, json=body, params=params or {})
        count += answer["count"]
        skipped += answer.get("skipped", 0)
        if answer["remaining"] == 0:
            break
        click.echo(f"{count} so far, {answer['remaining']} still match", err=True)
        stalled = 0 if answer["count"] else stalled + 1
        if stalled >= STALLED_CALLS:
            click.echo(
                f"{count} tasks; {answer['remaining']} still match but {STALLED_CALLS} calls "
                "in a row took none",
                err=True,
            )
            raise SystemExit(1)
        if not answer["count"]:
            time.sleep(0.1 * stalled)
    click.echo(f"{count} tasks" + (f", {skipped} skipped" if skipped else ""))


def _filter_body(**fields: str | None) -> dict[str, str]:
    return {k: v for k, v in fields.items() if v is not None}


@cli.command()
@click.argument("task_id", required=False)
@click.option("--force", is_flag=True, help="Also a running side-effecting task.")
@_filter_options(["pending", "queued", "running"])
def cancel(
    task_id: str | None,
    force: bool,
    status: str | None,
    name: str | None,
    label: str | None,
    created_before: str | None,
) -> None:
    """Cancel one task (ID) or every task matching the filter, calling until none remains."""
    params = {"force": "true"} if force else {}
    body = _filter_body(status=status, name=name, key=label, created_before=created_before)
    if task_id and body:
        raise click.UsageError("give an ID or a filter, not both")
    if task_id:
        _json(_client().call("POST", f"/tasks/{task_id}/cancel", params=params))
    elif body:
        _by_filter("/tasks/cancel", body, params)
    else:
        raise click.UsageError("give an ID or a filter (--status, --name, --key, --created-before)")


@cli.command()
@click.argument("task_id", required=False)
@_filter_options(["failed", "cancelled"])
def retry(
    task_id: str | None,
    status: str | None,
    name: str | None,
    label: str | None,
    created_before: str | None,
) -> None:
    """Retry one task (ID) or every task matching the filter, calling until none remains."""
    body = _filter_body(status=status, name=name, key=label, created_before=created_before)
    if task_id and body:
        raise click.UsageError("give an ID or a filter, not both")
    if task_id:
        _json(_client().call("POST", f"/tasks/{task_id}/retry"))
    elif body:
        _by_filter("/tasks/retry", body)
    else:
        raise click.UsageError("give an ID or a filter (--status, --name, --key, --created-before)")


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


def _top_view(client: Client, *, frame: int, interval_s: float) -> Group:
    status = client.call("GET", "/relay/status")
    nodes = client.call("GET", "/nodes")
    totals = status.get("totals") or {}
    alive = sum(1 for node in nodes.get("relays", []) if node.get("alive"))
    workers = sum(1 for node in nodes.get("workers", []) if node.get("alive"))
    summary = (
        f"pending {totals.get('pending', 0)} · in flight {totals.get('inflight', 0)} · "
        f"dispatched/min {totals.get('dispatched_last_minute', 0)} · relays {alive} · "
        f"workers {workers}"
    )
    parts: list[Any] = [
        summary,
        render.totals_table(status),
        render.status_table(status),
        render.nodes_table(nodes),
    ]
    if status.get("note"):
        parts.append(f"[bold red]{status['note']}")
    parts.append(
        f"[dim]{time.strftime('%H:%M:%S')} · frame {frame} · every {interval_s:g}s · Ctrl-C quits"
    )
    return Group(*parts)


@cli.command()
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.option(
    "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help="Seconds."
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many frames (default: until Ctrl-C).",
)
def top(once: bool, interval: float, count: int | None) -> None:
    """A live terminal view: totals, limits with backlog and in flight, nodes.

    Redraws every --interval seconds until Ctrl-C (exit 0). An API that stops answering
    shows in the view, which keeps trying; only the first frame's failure exits 2.
    """
    client = _client()
    if once:
        console.print(_top_view(client, frame=1, interval_s=interval))
        return
    frame = 1
    try:
        first = _top_view(client, frame=frame, interval_s=interval)
        with Live(first, console=console, screen=False, auto_refresh=False) as live:
            while count is None or frame < count:
                time.sleep(interval)
                frame += 1
                try:
                    view: Any = _top_view(client, frame=frame, interval_s=interval)
                except ApiError as error:
                    view = Group(f"[bold red]{error.message}", f"[dim]frame {frame}, retrying")
                live.update(view, refresh=True)
    except KeyboardInterrupt:
        # Ctrl-C is how a live view ends: a clean exit, no traceback.
        pass


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ApiError as error:  # raised outside click's own handling (asyncio)
        error.show()
        raise SystemExit(error.exit_code) from None
