"""``throttler.throttle.decide`` with every bucket in this process: the Redis limiter's twin.

For unit tests on a fake clock: the relay plan's simulation and the limiter's own tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from throttler.limits import LimitKey, RuleSet
from throttler.throttle import Admission, BucketState, Candidate, decide, plan


class MemoryLimiter:
    """Buckets in a dict; ``clock`` (seconds) is read by ``admit``, ``admit_at`` takes the time."""

    def __init__(self, *, rules: RuleSet, clock: Callable[[], float] = lambda: 0.0) -> None:
        self.rules = rules
        self.clock = clock
        self.states: dict[LimitKey, BucketState] = {}

    async def admit(self, candidates: Sequence[Candidate], *, horizon_s: float = 0.0) -> Admission:
        """As ``RedisLimiter.admit``, at the clock's time."""
        return self.admit_at(candidates, now_s=self.clock(), horizon_s=horizon_s)

    def admit_at(
        self, candidates: Sequence[Candidate], *, now_s: float, horizon_s: float
    ) -> Admission:
        """Admit what every applicable bucket allows at ``now_s``, and keep the buckets."""
        planned = plan(self.rules, candidates)
        decision = decide(
            [self.states.get(bucket.key) for bucket in planned.buckets],
            planned.buckets,
            planned.requests,
            now_s=now_s,
            horizon_s=horizon_s,
        )
        for bucket, state in zip(planned.buckets, decision.states, strict=True):
            self.states[bucket.key] = state
        return Admission(
            admitted=tuple(candidates[i] for i, _ in decision.admitted),
            ready_in_s=tuple(delay for _, delay in decision.admitted),
            blocked={planned.buckets[b].key: wait for b, wait in decision.blocked.items()},
            granted_at_s=now_s,
        )
