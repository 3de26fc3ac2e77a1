"""The observability profile: every Grafana panel queries metrics the code defines."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from api.cluster_view import ClusterView, ScopeSample
from api.metrics import ApiMetrics, _families
from relay import metrics as relay_metrics
from worker import metrics as worker_metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "observability" / "grafana" / "dashboards" / "throttler.json"
PROMETHEUS = ROOT / "observability" / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"
METRIC_NAME = re.compile(r"\bthrottler_[a-z0-9_]+\b")
# The series names each type exposes (prometheus-client, text format 0.0.4).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}


def _series(families: list[Metric]) -> set[str]:
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}


def defined_series() -> set[str]:
    """Every series name the API, relays and workers can expose."""
    view = ClusterView(
        read_at=0.0,
        tasks_by_status={"pending": 1},
        outbox_backlog=1,
        outbox_oldest_age_s=1.0,
        scopes=(
            ScopeSample(
                scope="cluster",
                backlog=1,
                inflight=1,
                dispatched_last_minute=1,
                inflight_cap=1,
                rate_per_s=1.0,
            ),
        ),
        paused={"host:example.com": 1.0},
        relays_alive=1,
        workers_alive=1,
        workers_running=1,
    )
    api_registry = CollectorRegistry()
    ApiMetrics(api_registry)
    families = [
        *_families(view),
        *api_registry.collect(),
        *relay_metrics.REGISTRY.collect(),
        *worker_metrics.REGISTRY.collect(),
    ]
    return _series(families)


def _panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return panels


def test_every_panel_queries_only_metrics_the_code_defines() -> None:
    defined = defined_series()
    assert _panels()
    for panel in _panels():
        exprs = [target["expr"] for target in panel["targets"]]
        assert exprs, f"panel {panel['title']!r} has no query"
        for expr in exprs:
            names = METRIC_NAME.findall(expr)
            assert names, f"panel {panel['title']!r}: {expr!r} names no throttler metric"
            unknown = set(names) - defined
            assert not unknown, f"panel {panel['title']!r} queries undefined {sorted(unknown)}"


def test_the_check_refuses_a_misspelt_metric() -> None:
    assert "throttler_tasks" in defined_series()
    assert "throttler_task" not in defined_series()
    assert "throttler_worker_run_seconds_bucket" in defined_series()
    assert "throttler_worker_run_seconds" not in defined_series()


def test_panels_draw_releases_per_scope_and_the_pauses() -> None:
    exprs = " ".join(target["expr"] for panel in _panels() for target in panel["targets"])
    assert "sum by (scope) (rate(throttler_relay_scope_released_total[1m]))" in exprs
    assert "throttler_scope_paused_until_timestamp_seconds" in exprs
    assert "throttler_relay_scope_released_total" in defined_series()
    assert "throttler_scope_paused_until_timestamp_seconds" in defined_series()


def test_the_profile_mounts_the_files_in_the_repo() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"]
        for volume in services[name]["volumes"]:
            source = volume.split(":", 1)[0]
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
    for name in ("api", "relay", "worker"):
        assert "observability" not in services[name].get("profiles", [])


def test_prometheus_scrapes_the_api_relays_and_workers() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"api", "relay", "worker"}
    assert jobs["api"]["static_configs"][0]["targets"] == ["api:8000"]
    assert jobs["api"]["metrics_path"] == "/metrics"
