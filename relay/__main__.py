"""``python -m relay``: run one relay until SIGTERM or SIGINT, then exit 0."""

from __future__ import annotations

import asyncio
import logging
import signal

from arq.connections import ArqRedis

from relay.metrics import serve_metrics
from relay.relay import Relay, last_dispatch_within_claims
from throttler import event_loop
from throttler.constants import FINISHED_CHANNEL, LIMITS_CHANNEL, SUBMITTED_CHANNEL
from throttler.db import create_engine
from throttler.dispatches import last_dispatch_from
from throttler.errors import REDIS_ERRORS
from throttler.limits import RuleSet
from throttler.logs import configure_logging, fields
from throttler.nodes import Heartbeat, Node, NodeKind, NodeRegistry
from throttler.periodic import Periodic
from throttler.reconcile import Reconciler
from throttler.redis_conn import RedisMisconfigured, connect_arq
from throttler.retention import Pruner
from throttler.retry import REDIS_RECONNECT, Outage, retry_until_done
from throttler.settings import Settings, load_settings
from throttler.store import open_store
from throttler.throttle import Limiter, build_limiter
from throttler.wakeup import WakeupListener

log = logging.getLogger("relay")


async def _connect_arq(settings: Settings, stopping: asyncio.Event) -> ArqRedis | None:
    """Connect to Redis, retrying with backoff until it answers or we are stopped."""
    # arq's own retries sleep without listening for signals; we retry instead (but not
    # a refused password or certificate: RedisMisconfigured ends the start).
    return await retry_until_done(
        lambda: connect_arq(settings),
        retry_on=REDIS_ERRORS,
        backoff=REDIS_RECONNECT,
        outage=Outage(log, down_event="relay.redis_unavailable", up_event="relay.redis_connected"),
        stopping=stopping,
    )


def wakeup_channels(relay: Relay) -> list[str]:
    """New work always; finished tasks too when a cap may be waiting for a free slot."""
    channels = [SUBMITTED_CHANNEL]
    if relay.caps or relay.settings.relay_max_queue_depth:
        channels.append(FINISHED_CHANNEL)
    return channels


async def serve(settings: Settings, *, relay_type: type[Relay] = Relay) -> None:
    """Build the relay and its resources, run it until a signal, close everything.

    Beside the dispatch loop each relay runs the reconciler (tasks whose ARQ job is gone
    go back to the outbox) and the retention pruner, both safe with many relays, and its
    heartbeat in the node registry (throttler.nodes).
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    relay: Relay | None = None
    housekeepers: list[Periodic] = []
    listeners: list[WakeupListener] = []

    def on_signal() -> None:
        stopping.set()
        if relay is not None:
            relay.stop()
        for housekeeper in housekeepers:
            housekeeper.stop()
        for listener in listeners:
            listener.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    engine = create_engine(settings)
    arq: ArqRedis | None = None
    try:
        arq = await _connect_arq(settings, stopping)
        if arq is None:
            return
        store = open_store(settings, engine)
        recovery = store.recovery
        redis = arq

        def limiter_for(rules: RuleSet) -> Limiter:
            return build_limiter(
                redis=redis,
                rules=rules,
                last_dispatch=last_dispatch_within_claims(last_dispatch_from(recovery)),
            )

        relay = relay_type(
            settings=settings,
            outbox=store.outbox,
            arq=arq,
            limiter=limiter_for(settings.limit_rules),
            limiter_for=limiter_for,
        )
        housekeepers.extend(
            [
                Reconciler(settings=settings, store=recovery, redis=arq),
                Pruner(settings=settings, store=recovery),
                Heartbeat(
                    registry=NodeRegistry(arq),
                    node=Node.this_process(NodeKind.RELAY, relay.relay_id),
                    log=log,
                ),
            ]
        )
        listeners += [
            WakeupListener(redis=arq, channels=wakeup_channels(relay), on_message=relay.wake),
            # Limit changes end any sleep (relay.wake does not while the cluster is blocked).
            WakeupListener(redis=arq, channels=[LIMITS_CHANNEL], on_message=relay.limits_changed),
        ]
        if stopping.is_set():
            return
        await asyncio.gather(
            relay.run(),
            *(listener.run() for listener in listeners),
            *(housekeeper.run() for housekeeper in housekeepers),
        )
    finally:
        if arq is not None:
            await arq.aclose()
        await engine.dispose()


def main() -> None:
    settings = load_settings()
    configure_logging(component="relay", level=settings.log_level)
    serve_metrics(settings.relay_metrics_port)
    try:
        event_loop.run(serve(settings))
    except RedisMisconfigured as error:
        log.error("relay.redis_misconfigured", extra=fields(error=str(error)))  # noqa: TRY400 - one line, no traceback
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
