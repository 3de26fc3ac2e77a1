"""Names shared across components, in one place."""

from __future__ import annotations

API_PREFIX = "/api/v1"
DEFAULT_ACCOUNT = "default"
DEFAULT_PRIORITY = 5
# Redis key under which relays share the cluster token bucket (see throttler.throttle).
RATE_BUCKET_KEY_PREFIX = "throttler:bucket:"
