"""Names shared across components, in one place."""

from __future__ import annotations

API_PREFIX = "/api/v1"
DEFAULT_ACCOUNT = "default"
DEFAULT_PRIORITY = 5
# Redis key under which relays share the cluster token bucket (see throttler.throttle).
RATE_BUCKET_KEY_PREFIX = "throttler:bucket:"
# PostgreSQL advisory lock that makes claim transactions take turns when an in-flight cap
# is set, so two relays cannot both count the same free slots (SQLite serializes anyway).
CLAIM_LOCK_KEY = 0x7468726F74  # "throt"
# Redis pub/sub channel on which workers and reconcilers announce, after the commit, the
# id of each task they made terminal; the API wakes its long-poll waiters from it.
FINISHED_CHANNEL = "throttler:finished"
# Redis pub/sub channel on which the API announces, after the commit, that new tasks are
# in the outbox; an idle relay wakes on it instead of waiting out its poll interval.
SUBMITTED_CHANNEL = "throttler:submitted"
# Redis key (no TTL) holding the moment up to which buckets missing from Redis may have
# been drained: set when the limiter finds Redis without it (see throttler.throttle).
RATE_DRAIN_FLOOR_KEY = "throttler:bucket-drain-floor"
# Redis key (no TTL) naming the server that started the buckets' current generation and
# its number: buckets written by another server (before a failover, or a restart from a
# file) may have lost takes (see throttler.throttle).
RATE_GENERATION_KEY = "throttler:bucket-generation"
# Redis hash per live node (``<prefix><kind>:<id>``, kind ``relay`` or ``worker``), and the
# sorted set indexing them by last heartbeat (see throttler.nodes).
NODE_KEY_PREFIX = "throttler:node:"
NODES_INDEX_KEY = "throttler:nodes"
# Redis hash: relay id -> what that relay saw at its latest claims, why pending tasks
# wait (see throttler.waiting); read for the live relays only, in one round trip with
# the nodes index.
WAITING_BOARDS_KEY = "throttler:waiting"
# Redis pub/sub channel on which the API announces, after the commit, that a limit rule
# or pause changed; relays reload at once instead of at their next version check.
LIMITS_CHANNEL = "throttler:limits"
