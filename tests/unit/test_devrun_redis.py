"""make run starts its own Redis only when the settings name none."""

from __future__ import annotations

from devtools.run import needs_private_redis
from throttler.settings import Settings


def test_a_private_redis_only_when_no_redis_is_named() -> None:
    assert needs_private_redis(Settings())
    assert not needs_private_redis(Settings(redis_url="redis://cache.internal:6379/0"))
    # Sentinel mode: the master comes from the sentinels, REDIS_URL may stay unset.
    assert not needs_private_redis(Settings(redis_sentinels="10.0.0.1:26379,10.0.0.2:26379"))
