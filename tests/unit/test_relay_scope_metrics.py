"""A relay's releases per scope: which series a scrape shows, and that they stay bounded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics
from relay.metrics import BUSY_WINDOW_S, MAX_TRACKED_VALUES, ScopeKeys, ScopeReleases
from throttler.limits import RuleSet
from throttler.statuses import TaskStatus
from throttler.store.outbox import ClaimedTask

HOSTS = "host:*"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scraped(releases: ScopeReleases) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(releases)
    text = generate_latest(registry).decode()
    return {
        sample.labels["scope"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "throttler_relay_scope_released_total"
    }


def hosts(counts: dict[str, int]) -> dict[tuple[str, str | None], int]:
    return {(f"host:{host}", HOSTS): count for host, count in counts.items()}


def test_specific_scopes_always_show_and_each_wildcard_its_busiest() -> None:
    releases = ScopeReleases(top=2, clock=Clock())
    releases.add({("task:download", None): 10, ("cluster", None): 10})
    releases.add(hosts({"a": 1, "b": 5, "c": 4}))
    releases.add({("key:tenant:x", "key:tenant:*"): 1, ("key:tenant:y", "key:tenant:*"): 2})
    assert scraped(releases) == {
        "task:download": 10,
        "cluster": 10,
        "host:b": 5,
        "host:c": 4,
        "key:tenant:x": 1,
        "key:tenant:y": 2,
    }


def test_a_value_that_drops_out_is_forgotten_after_an_idle_window() -> None:
    clock = Clock()
    releases = ScopeReleases(top=1, clock=clock)
    releases.add(hosts({"old": 5}))
    clock.now += BUSY_WINDOW_S
    # Busier now: old drops out of the top, still counted while a window remembers it.
    releases.add(hosts({"new": 9}))
    assert scraped(releases) == {"host:new": 9}
    assert releases.tracked() == 2
    clock.now += BUSY_WINDOW_S
    assert scraped(releases) == {"host:new": 9}
    assert releases.tracked() == 1
    # A value back in the top continues its count while remembered.
    releases.add(hosts({"new": 1}))
    clock.now += BUSY_WINDOW_S
    assert scraped(releases) == {"host:new": 10}


def test_the_top_keeps_its_series_when_idle() -> None:
    clock = Clock()
    releases = ScopeReleases(top=3, clock=clock)
    releases.add(hosts({"a": 1, "b": 2}))
    clock.now += 5 * BUSY_WINDOW_S
    assert scraped(releases) == {"host:a": 1, "host:b": 2}


def test_many_values_within_one_window_stay_bounded() -> None:
    releases = ScopeReleases(top=2, clock=Clock())
    for n in range(5 * MAX_TRACKED_VALUES):
        releases.add(hosts({f"h{n}": 1 + (n == 7)}))
    assert releases.tracked() <= 2 * MAX_TRACKED_VALUES
    shown = scraped(releases)
    assert len(shown) == 2
    assert shown["host:h7"] == 2


def test_scope_keys_name_scopes_as_the_api_does() -> None:
    rules = RuleSet.parse(
        "host:* inflight=5; account:acme rate=1/s; key:tenant:* inflight=2; task:download "
        "inflight=3; task:greeting inflight=1",
        cluster_rate_per_s=10,
    )
    claim = ClaimedTask(
        outbox_id=1,
        task_id="t",
        name="download",
        account="acme",
        status=TaskStatus.PENDING,
        host="example.com",
        labels=("connector:x", "tenant:acme"),
    )
    assert set(ScopeKeys(rules).of(claim)) == {
        ("cluster", None),
        ("task:download", None),
        ("account:acme", None),
        ("host:example.com", HOSTS),
        ("key:tenant:acme", "key:tenant:*"),
    }


def test_released_tasks_count_by_name_and_scope() -> None:
    releases = ScopeReleases(top=5, clock=Clock())
    rules = RuleSet.parse("host:* inflight=5")
    claims = [
        ClaimedTask(
            outbox_id=n,
            task_id=f"t{n}",
            name="download",
            account="a",
            status=TaskStatus.PENDING,
            host=f"h{n % 2}.example",
        )
        for n in range(5)
    ]
    saved = metrics.SCOPE_RELEASES
    metrics.SCOPE_RELEASES = releases
    try:
        # t4 did not reach ARQ: not counted.
        metrics.count_released(claims, {"t0", "t1", "t2", "t3"}, ScopeKeys(rules))
    finally:
        metrics.SCOPE_RELEASES = saved
    assert scraped(releases) == {"host:h0.example": 2, "host:h1.example": 2}
