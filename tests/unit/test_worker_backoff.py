"""Retry backoff: exponential from the base, capped, jittered within [half, full]."""

from __future__ import annotations

import pytest

from worker.taskkit.backoff import retry_delay_s


@pytest.mark.parametrize(
    ("attempt", "low", "high"),
    [
        (1, 0.5, 1.0),
        (2, 1.0, 2.0),
        (3, 2.0, 4.0),
        (4, 4.0, 8.0),
        (9, 5.0, 10.0),
        (10_000, 5.0, 10.0),
    ],
)
def test_delay_doubles_per_attempt_up_to_the_cap(attempt: int, low: float, high: float) -> None:
    def delay(rng_value: float) -> float:
        return retry_delay_s(attempt=attempt, base_s=1.0, max_s=10.0, rng=lambda: rng_value)

    assert delay(0.0) == pytest.approx(low)
    assert delay(1.0) == pytest.approx(high)
    assert low <= delay(0.37) <= high


def test_default_jitter_stays_in_range() -> None:
    delays = {retry_delay_s(attempt=3, base_s=0.5, max_s=60.0) for _ in range(200)}
    assert all(1.0 <= value <= 2.0 for value in delays)
    assert len(delays) > 1


def test_zero_base_means_immediate_retry() -> None:
    assert retry_delay_s(attempt=5, base_s=0.0, max_s=300.0) == 0.0


def test_attempt_is_one_based() -> None:
    with pytest.raises(ValueError, match="attempt"):
        retry_delay_s(attempt=0, base_s=1.0, max_s=10.0)
