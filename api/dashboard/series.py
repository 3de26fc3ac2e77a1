"""Releases per second over the last five minutes, per limited scope, from ``task_events``.

A release is a ``queued`` event (its ``at`` is the release moment). The first refresh
counts the whole window, ``RECOUNT_S`` + 1 seconds per statement; later ones count again
only the last ``RECOUNT_S`` seconds (a relay may move a queued event it has not handed to
ARQ yet to its later release moment) and keep the older seconds as counted. Each statement
groups a range of ``ix_task_events_event_at`` joined to each event's task by primary key:
its cost follows the releases it counts, never the size of the tables (the statements are
the store's: ``throttler.store.monitoring``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from throttler.limits import Scope
from throttler.store.monitoring import MonitoringStore

WINDOW_S = 300
RECOUNT_S = 15
CLUSTER = "cluster"

# (name, account, host) of the tasks released in one second -> how many.
Releases = dict[tuple[str, str, str | None], int]


@dataclass(frozen=True, kw_only=True, slots=True)
class SeriesPublic:
    """Per scope, releases in each second from ``start`` (Unix seconds), oldest first."""

    start: int
    step_s: int
    series: Mapping[str, list[int]]


class ReleaseSeries:
    """The per-second release counts of the window, refreshed incrementally."""

    def __init__(self, monitoring: MonitoringStore) -> None:
        self._monitoring = monitoring
        self._releases: dict[int, Releases] = {}
        self._labels: dict[int, dict[str, int]] = {}
        self._counted_once = False

    async def refresh(self, *, now_s: float, labels: Iterable[str] = ()) -> None:
        """Count the seconds not counted yet (all of the window the first time)."""
        end = math.floor(now_s)
        start = end - WINDOW_S + 1
        since = start if not self._counted_once else max(start, end - RECOUNT_S)
        wanted = sorted(set(labels))
        releases: dict[int, Releases] = {}
        by_label: dict[int, dict[str, int]] = {}
        # The first count too goes RECOUNT_S + 1 seconds at a time: every statement covers
        # the same short range, so each plan stays an index range joined by primary key
        # (a whole window of releases made PostgreSQL hash-join a scan of every task).
        for first in range(since, end + 1, RECOUNT_S + 1):
            last = min(end, first + RECOUNT_S)
            counted, labelled = await self._count(since=first, until=last, labels=wanted)
            releases.update(counted)
            by_label.update(labelled)
        for table in (self._releases, self._labels):
            for second in [s for s in table if s < start or s >= since]:
                del table[second]
        self._releases.update(releases)
        self._labels.update(by_label)
        self._counted_once = True

    async def _count(
        self, *, since: int, until: int, labels: list[str]
    ) -> tuple[dict[int, Releases], dict[int, dict[str, int]]]:
        counted = await self._monitoring.releases(since=since, until=until, labels=labels)
        releases: dict[int, Releases] = {}
        by_label: dict[int, dict[str, int]] = {}
        for row in counted.tasks:
            releases.setdefault(row.second, {})[(row.name, row.account, row.host)] = row.released
        for labelled in counted.labels:
            by_label.setdefault(labelled.second, {})[labelled.label] = labelled.released
        return releases, by_label

    def series(self, scopes: Iterable[str], *, now_s: float) -> SeriesPublic:
        """The window ending at ``now_s`` for ``cluster`` and each of ``scopes``."""
        end = math.floor(now_s)
        start = end - WINDOW_S + 1
        wanted = [CLUSTER, *(scope for scope in scopes if scope != CLUSTER)]
        series = {scope: [0] * WINDOW_S for scope in wanted}
        columns = {Scope.TASK.value: 0, Scope.ACCOUNT.value: 1, Scope.HOST.value: 2}
        by_column: dict[tuple[int, str], str] = {}
        for scope in wanted:
            kind, _, value = scope.partition(":")
            if kind in columns:
                by_column[(columns[kind], value)] = scope
        # Which of the wanted scopes each (name, account, host) counts towards, found once.
        matched: dict[tuple[str, str, str | None], list[list[int]]] = {}
        for second, released in self._releases.items():
            index = second - start
            if not 0 <= index < WINDOW_S:
                continue
            for combo, count in released.items():
                targets = matched.get(combo)
                if targets is None:
                    targets = [series[CLUSTER]]
                    for column, part in enumerate(combo):
                        found = None if part is None else by_column.get((column, part))
                        if found is not None:
                            targets.append(series[found])
                    matched[combo] = targets
                for target in targets:
                    target[index] += count
        for second, counted in self._labels.items():
            index = second - start
            if 0 <= index < WINDOW_S:
                for label, count in counted.items():
                    scope = f"{Scope.KEY.value}:{label}"
                    if scope in series:
                        series[scope][index] += count
        return SeriesPublic(start=start, step_s=1, series=series)
