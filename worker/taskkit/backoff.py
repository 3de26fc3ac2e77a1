"""How long to wait before the next attempt: exponential, capped, with jitter."""

from __future__ import annotations

import random
from collections.abc import Callable

# 2**62 already exceeds any sensible cap; a larger exponent would overflow a float.
_MAX_EXPONENT = 62


def retry_delay_s(
    *,
    attempt: int,
    base_s: float,
    max_s: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """Return the delay after failed ``attempt`` (1-based): base·2^(attempt-1), capped, jittered.

    Equal jitter: half the capped delay is fixed and the other half random, so tasks that
    failed together spread out yet never retry sooner than half the nominal delay.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    exponent = min(attempt - 1, _MAX_EXPONENT)
    ceiling = min(max_s, base_s * 2.0**exponent)
    return ceiling / 2 + (ceiling / 2) * rng()
