"""A relay process's own metrics: claims, releases into ARQ, and what held releases back.

One registry per process (``REGISTRY``), served on ``RELAY_METRICS_PORT`` when set
(``serve_metrics``); in-process relays (the tests) share it, so read differences. Every
label is bounded: ``task`` is a task name from the catalog, never free text; ``reason``
one of ``HELD_BACK_REASONS``; ``scope`` a limited scope as the API's /metrics names it
(``cluster``, ``task:download``, ``host:example.com``, ``key:tenant:acme``), each
specific rule's key plus the ``METRICS_TOP_SCOPES`` busiest values of each ``*`` rule
(``ScopeReleases``).

The relay's hooks stay thin: a claim adds a few counts (``count_held_back``); a settled
handover counts its releases by task name and by scope in one pass (``count_released``),
the scopes of a task found once per distinct (name, account, host, labels) under the
rules in force (``ScopeKeys``). Nothing here reads a database or Redis.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from throttler.limits import RuleSet
from throttler.store.outbox import ClaimedTask

REGISTRY = CollectorRegistry()

CLAIMS = Counter(
    "throttler_relay_claims",
    "Claim transactions this relay ran (each leases what the limits admit, maybe nothing).",
    registry=REGISTRY,
)
RELEASED = Counter(
    "throttler_relay_released",
    "Tasks this relay handed to ARQ, by task name.",
    ["task"],
    registry=REGISTRY,
)
LATE = Counter(
    "throttler_relay_late",
    "Tasks still late after every retime: left leased, released again once the lease lapses.",
    registry=REGISTRY,
)
# Why releases were held back. inflight, rate: claimed rows a claim left in the outbox
# (a row held back by several claims counts each time). queue_full: a claim the room in
# ARQ's queue cut short (it selects no more rows than the room, so none is read to be
# left). paused: a paused scope a claim left out, once per scope and claim (its rows are
# never read either). Keys found full or out of tokens are left out of the next claims
# until they have room: their rows are counted when first turned away, not while left out.
INFLIGHT = "inflight"
QUEUE_FULL = "queue_full"
RATE = "rate"
PAUSED = "paused"
HELD_BACK_REASONS = (INFLIGHT, QUEUE_FULL, RATE, PAUSED)
HELD_BACK = Counter(
    "throttler_relay_held_back",
    "Releases held back, by reason: inflight (a cap full) and rate (no token yet) count "
    "claimed rows left in the outbox; queue_full counts claims ARQ's queue room cut short; "
    "paused counts each paused scope a claim left out.",
    ["reason"],
    registry=REGISTRY,
)
ENQUEUE_FAILURES = Counter(
    "throttler_relay_enqueue_failures",
    "Enqueues into ARQ that failed (the rows stay in the outbox and are claimed again).",
    registry=REGISTRY,
)
# Every reason from the start, at 0: a rate() over a series that appears late misses its
# first increase.
_HELD_BACK = {reason: HELD_BACK.labels(reason) for reason in HELD_BACK_REASONS}


def count_held_back(*, inflight: int, queue_full: int, rate: int, paused: int) -> None:
    """Count what one claim held back, by reason (see ``HELD_BACK``)."""
    for reason, count in (
        (INFLIGHT, inflight),
        (QUEUE_FULL, queue_full),
        (RATE, rate),
        (PAUSED, paused),
    ):
        if count > 0:
            _HELD_BACK[reason].inc(count)


# A task's limited scopes: (scope, the ``*`` rule it comes from as ``host:*`` or
# ``key:tenant:*``, None for a specific rule).
ScopesOf = tuple[tuple[str, str | None], ...]
# Distinct (name, account, host, labels) whose scopes a ``ScopeKeys`` keeps at most.
SCOPE_KEYS_CACHE = 10_000


class ScopeKeys:
    """The limited scopes a task counts toward under one rule set, as /metrics names them.

    Cached by what the rules look at, so a relay releasing many tasks of few kinds asks
    the rules once per kind; the cache starts over past ``SCOPE_KEYS_CACHE`` entries.
    """

    def __init__(self, rules: RuleSet) -> None:
        self._rules = rules
        self._cache: dict[tuple[str, str, str | None, tuple[str, ...]], ScopesOf] = {}

    def of(self, claim: ClaimedTask) -> ScopesOf:
        signature = (claim.name, claim.account, claim.host, claim.labels)
        found = self._cache.get(signature)
        if found is None:
            if len(self._cache) >= SCOPE_KEYS_CACHE:
                self._cache.clear()
            applied = self._rules.applicable(
                name=claim.name, account=claim.account, host=claim.host, labels=claim.labels
            )
            found = tuple(
                (str(a.key), f"{a.rule.scope.value}:{a.rule.value}" if a.rule.is_each else None)
                for a in applied
            )
            self._cache[signature] = found
        return found


# How long one window of ``ScopeReleases`` lasts: "busiest" is releases in the current
# window and the one before it (one to two minutes).
BUSY_WINDOW_S = 60.0
# The most values of one ``*`` rule a relay keeps counts for, however many it sees (the
# least busy go first); never fewer than ten times the number exposed.
MAX_TRACKED_VALUES = 1000


@dataclass(kw_only=True, slots=True)
class _Wildcard:
    """The values of one ``*`` rule a relay counts: totals, and releases per window."""

    totals: dict[str, float] = field(default_factory=dict)
    current: Tally[str] = field(default_factory=Tally)
    previous: Tally[str] = field(default_factory=Tally)

    def busiest(self, count: int) -> list[str]:
        """The ``count`` values with the most recent releases; ties by name (stable)."""
        ranked = sorted(self.totals, key=lambda v: (-(self.current[v] + self.previous[v]), v))
        return ranked[:count]

    def rotate(self, *, keep: int, most: int) -> None:
        """Start a window; forget the values idle through the last one outside the ``keep``
        busiest, and any beyond the ``most`` busiest."""
        self.previous, self.current = self.current, Tally()
        self.trim(keep=keep, most=most)

    def trim(self, *, keep: int, most: int) -> None:
        ranked = self.busiest(len(self.totals))
        for rank, value in enumerate(ranked):
            if rank >= most or (rank >= keep and not (self.previous[value] or self.current[value])):
                del self.totals[value]
                self.previous.pop(value, None)
                self.current.pop(value, None)

    def add(self, value: str, count: int, *, keep: int, most: int) -> None:
        if value not in self.totals and len(self.totals) >= 2 * most:
            # Many new values within one window: keep the busiest ``most`` now.
            self.trim(keep=keep, most=most)
        self.totals[value] = self.totals.get(value, 0.0) + count
        self.current[value] += count


class ScopeReleases(Collector):
    """``throttler_relay_scope_released_total{scope}``: releases per limited scope, bounded.

    Every specific rule's key (and ``cluster`` when it has a rule) has its series; each
    ``*`` rule exposes its ``top`` busiest values (most releases over the last one to two
    ``BUSY_WINDOW_S``). A value that drops out of the top keeps its count while it stays
    busy, and is forgotten once a whole window passes without a release of it (back
    later, its count starts again at 0, which Prometheus reads as a counter reset); at
    most ``MAX_TRACKED_VALUES`` (or ten times ``top``) values per rule are kept, twice that
    between two windows. Scrapes run in the metrics server's thread:
    a lock guards the counts.
    """

    def __init__(self, *, top: int = 20, clock: Callable[[], float] = time.monotonic) -> None:
        self.top = top
        self._clock = clock
        self._lock = threading.Lock()
        self._specific: dict[str, float] = {}
        self._wildcards: dict[str, _Wildcard] = {}
        self._window_ends = self._clock() + BUSY_WINDOW_S

    def add(self, counts: Mapping[tuple[str, str | None], int]) -> None:
        """Count releases: (scope, its ``*`` rule or None) -> how many."""
        with self._lock:
            self._rotate_if_due()
            most = self._most()
            for (scope, rule), count in counts.items():
                if rule is None:
                    self._specific[scope] = self._specific.get(scope, 0.0) + count
                else:
                    wildcard = self._wildcards.get(rule)
                    if wildcard is None:
                        wildcard = self._wildcards[rule] = _Wildcard()
                    wildcard.add(scope, count, keep=self.top, most=most)

    def _rotate_if_due(self) -> None:
        now = self._clock()
        if now < self._window_ends:
            return
        most = self._most()
        for wildcard in self._wildcards.values():
            # Two windows or more went by without a release: both are empty.
            wildcard.rotate(keep=self.top, most=most)
            if now >= self._window_ends + BUSY_WINDOW_S:
                wildcard.rotate(keep=self.top, most=most)
        self._wildcards = {rule: w for rule, w in self._wildcards.items() if w.totals}
        self._window_ends = now + BUSY_WINDOW_S

    def _most(self) -> int:
        return max(MAX_TRACKED_VALUES, 10 * self.top)

    def exposed(self) -> dict[str, float]:
        """The series a scrape shows now: scope -> releases."""
        with self._lock:
            self._rotate_if_due()
            shown = dict(self._specific)
            for wildcard in self._wildcards.values():
                for value in wildcard.busiest(self.top):
                    # A value whose rule changed from ``*`` to its own counts both ways.
                    shown[value] = shown.get(value, 0.0) + wildcard.totals[value]
            return shown

    def tracked(self) -> int:
        """How many wildcard values this relay keeps counts for (bounded, see above)."""
        with self._lock:
            return sum(len(w.totals) for w in self._wildcards.values())

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for scope, value in sorted(self.exposed().items()):
            family.add_metric([scope], value)
        return [family]

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "throttler_relay_scope_released",
            "Tasks this relay handed to ARQ, per limited scope: each specific rule's key and "
            "the METRICS_TOP_SCOPES busiest values of each * rule.",
            labels=["scope"],
        )


SCOPE_RELEASES = ScopeReleases()
REGISTRY.register(SCOPE_RELEASES)


def count_released(
    claims: Iterable[ClaimedTask], enqueued: Collection[str], scopes: ScopeKeys
) -> None:
    """Count the tasks of ``claims`` now in ARQ, by task name and by limited scope."""
    by_name: Tally[str] = Tally()
    by_scope: Tally[tuple[str, str | None]] = Tally()
    for claim in claims:
        if claim.task_id in enqueued:
            by_name[claim.name] += 1
            by_scope.update(scopes.of(claim))
    for name, count in by_name.items():
        RELEASED.labels(name).inc(count)
    if by_scope:
        SCOPE_RELEASES.add(by_scope)


def serve_metrics(port: int, *, addr: str = "0.0.0.0") -> None:  # noqa: S104 - scraped by Prometheus
    """Serve ``REGISTRY`` on ``port`` from a daemon thread; 0 leaves it off."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)
