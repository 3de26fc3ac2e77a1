"""Rich tables for the API's answers."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def tasks_table(tasks: list[dict[str, Any]]) -> Table:
    table = Table("task_id", "name", "status", "attempts", "created_at", "error")
    for task in tasks:
        table.add_row(
            task["task_id"],
            task["name"],
            task["status"],
            str(task.get("attempts", "")),
            str(task.get("created_at", "")),
            (task.get("error") or "")[:60],
        )
    return table


def view_table(task: dict[str, Any]) -> Table:
    table = Table("field", "value", title=f"task {task['task_id']}")
    for field, value in task.items():
        table.add_row(field, "" if value is None else str(value))
    return table


def events_table(events: list[dict[str, Any]]) -> Table:
    table = Table("at", "event", "detail", title="timeline")
    for event in events:
        table.add_row(str(event["at"]), event["event"], str(event.get("detail") or ""))
    return table


def limits_table(rules: list[dict[str, Any]]) -> Table:
    table = Table("scope", "rate", "burst", "inflight", "paused_until", "source")
    for rule in rules:
        table.add_row(
            *(
                "" if rule.get(col) is None else str(rule[col])
                for col in ("scope", "rate", "burst", "inflight", "paused_until", "source")
            )
        )
    return table


def nodes_table(nodes: dict[str, Any]) -> Table:
    table = Table("kind", "id", "host", "pid", "alive", "running", "last_seen")
    for kind in ("relays", "workers"):
        for node in nodes.get(kind, []):
            table.add_row(
                kind[:-1],
                node["id"],
                str(node.get("host", "")),
                str(node.get("pid", "")),
                "yes" if node.get("alive") else "NO",
                str(node.get("running", "")),
                str(node.get("last_seen", "")),
            )
    return table


def status_table(status: dict[str, Any]) -> Table:
    """``/relay/status``: the cluster rule and each limited key, with backlog and in flight."""
    table = Table("key", "rule", "backlog", "inflight", "dispatched/min", title="limits now")
    # No cluster rule: no cluster row, and the keys still listed.
    rows = [status["cluster"]] if status.get("cluster") else []
    rows.extend(status.get("keys", []))
    for row in rows:
        table.add_row(
            row["key"],
            str(row.get("rule") or ""),
            str(row.get("backlog", "")),
            str(row.get("inflight", "")),
            str(row.get("dispatched_last_minute", "")),
        )
    return table


def totals_table(status: dict[str, Any]) -> Table:
    totals = status.get("totals") or {}
    table = Table(*(str(k) for k in totals), title="all tasks")
    table.add_row(*(str(v) for v in totals.values()))
    return table
