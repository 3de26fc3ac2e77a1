"""Retry-After as the download reads it, and the pause a push-back asks for."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from throttler.settings import Settings
from worker.taskkit.backpressure import pause_s
from worker.tasks.download import retry_after_s

NOW = datetime(2026, 11, 29, 11, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("2", 2.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("Sun, 29 Nov 2026 11:00:30 GMT", 30.0),
        # A date in the past asks for no pause at all.
        ("Sun, 29 Nov 2026 10:00:00 GMT", 0.0),
        # The obsolete RFC 850 form is still an HTTP-date.
        ("Sunday, 29-Nov-26 11:01:00 GMT", 60.0),
    ],
)
def test_delta_seconds_and_http_dates(header: str, expected: float) -> None:
    assert retry_after_s(header, now=NOW) == expected


@pytest.mark.parametrize("header", [None, "", "soon", "-5", "1.5", "Sun, 99 Nov 2026 GMT"])
def test_missing_or_invalid_is_not_a_number(header: str | None) -> None:
    assert math.isnan(retry_after_s(header, now=NOW))


def test_the_pause_is_clamped_and_defaults() -> None:
    settings = Settings(upstream_default_pause_s=30, upstream_max_pause_s=3600)
    assert pause_s(settings, math.nan) == 30
    assert pause_s(settings, 7200) == 3600
    assert pause_s(settings, -1) == 0
    assert pause_s(settings, 2.5) == 2.5
