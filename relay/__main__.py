"""``python -m relay``: run one relay until SIGTERM or SIGINT, then exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.exceptions import RedisError

from relay.relay import BACKOFF_MAX_S, BACKOFF_MIN_S, Relay
from throttler.constants import FINISHED_CHANNEL, SUBMITTED_CHANNEL
from throttler.db import create_engine, create_read_session_factory, create_session_factory
from throttler.dispatches import last_dispatch_from
from throttler.logs import configure_logging, fields
from throttler.periodic import Periodic
from throttler.reconcile import Reconciler
from throttler.retention import Pruner
from throttler.settings import Settings, load_settings
from throttler.store.recovery import open_recovery
from throttler.throttle import build_limiter
from throttler.wakeup import WakeupListener

log = logging.getLogger("relay")


async def _connect_arq(settings: Settings, stopping: asyncio.Event) -> ArqRedis | None:
    """Connect to Redis, retrying with backoff until it answers or we are stopped."""
    redis_settings = RedisSettings.from_dsn(settings.redis_url)
    # arq's own retries sleep without listening for signals; we retry instead.
    redis_settings.conn_retries = 0
    backoff_s = BACKOFF_MIN_S
    while not stopping.is_set():
        try:
            return await create_pool(redis_settings, default_queue_name=settings.arq_queue_name)
        except (RedisError, OSError) as error:
            log.error(  # noqa: TRY400 - one line per failure
                "relay.redis_unavailable",
                extra=fields(error=f"{type(error).__name__}: {error}", retry_in_s=backoff_s),
            )
            try:
                await asyncio.wait_for(stopping.wait(), timeout=backoff_s)
            except TimeoutError:
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
    return None


def wakeup_channels(relay: Relay) -> list[str]:
    """New work always; finished tasks too when a cap may be waiting for a free slot."""
    channels = [SUBMITTED_CHANNEL]
    if relay.caps or relay.settings.relay_max_queue_depth:
        channels.append(FINISHED_CHANNEL)
    return channels


async def serve(settings: Settings, *, relay_type: type[Relay] = Relay) -> None:
    """Build the relay and its resources, run it until a signal, close everything.

    Beside the dispatch loop each relay runs the reconciler (tasks whose ARQ job is gone
    go back to the outbox) and the retention pruner; both are safe with many relays.
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    relay: Relay | None = None
    housekeepers: list[Periodic] = []
    listener: WakeupListener | None = None

    def on_signal() -> None:
        stopping.set()
        if relay is not None:
            relay.stop()
        for housekeeper in housekeepers:
            housekeeper.stop()
        if listener is not None:
            listener.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    engine = create_engine(settings)
    arq: ArqRedis | None = None
    try:
        arq = await _connect_arq(settings, stopping)
        if arq is None:
            return
        sessions = create_session_factory(engine)
        read_sessions = create_read_session_factory(engine)
        recovery = open_recovery(settings, engine)
        relay = relay_type(
            settings=settings,
            sessions=sessions,
            read_sessions=read_sessions if settings.is_sqlite else None,
            arq=arq,
            limiter=build_limiter(
                redis=arq,
                rules=settings.limit_rules,
                last_dispatch=last_dispatch_from(recovery),
            ),
        )
        housekeepers.extend(
            [
                Reconciler(settings=settings, store=recovery, redis=arq),
                Pruner(settings=settings, store=recovery),
            ]
        )
        listener = WakeupListener(redis=arq, channels=wakeup_channels(relay), on_message=relay.wake)
        if stopping.is_set():
            return
        await asyncio.gather(
            relay.run(),
            listener.run(),
            *(housekeeper.run() for housekeeper in housekeepers),
        )
    finally:
        if arq is not None:
            await arq.aclose()
        await engine.dispose()


def main() -> None:
    settings = load_settings()
    configure_logging(component="relay", level=settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
