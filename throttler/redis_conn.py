"""Every Redis connection of ours, made in one place from the settings.

REDIS_URL gives the scheme (``rediss://``: TLS), the ACL user and password, the database
and, without Sentinel, the host; REDIS_TLS_* give the CA, the client certificate and the
hostname check; REDIS_SENTINELS and REDIS_SENTINEL_SERVICE name the sentinels and the
master to ask them for. Three things are built from them:

- ``arq_redis_settings``: ARQ's RedisSettings, for a worker that connects by itself;
- ``connect_arq``: the ARQ pool of relays and workers, connected and pinged;
- ``redis_client``: a plain redis-py client (the API, the worker's hop limits).

In Sentinel mode each connection asks the sentinels for the master's address when it
opens, so after a failover the next connection reaches the new master (a connection to
a demoted master fails with ReadOnlyError and is replaced). ARQ's create_pool gives its
connections no command timeout (REDIS_TIMEOUT_S), and its Sentinel support no CA or
client certificate: ``connect_arq`` builds the pool itself.

A wrong password or a certificate that does not verify is not an outage: at start it
raises RedisMisconfigured, naming the setting, instead of being retried for ever.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio import Redis
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.exceptions import AuthenticationError, ResponseError

if TYPE_CHECKING:
    from throttler.settings import Settings

DEFAULT_PORT = 6379
# How long opening one connection (TCP and TLS handshake) may take; ARQ's own default.
CONNECT_TIMEOUT_S = 1.0
# A sentinel that accepts the connection but never answers must not hold a discovery.
SENTINEL_TIMEOUT_S = 1.0


class RedisMisconfigured(RuntimeError):
    """Redis answered, but refused our credentials or certificate: retrying cannot help."""


@dataclass(frozen=True, kw_only=True, slots=True)
class RedisUrl:
    """REDIS_URL taken apart (the password unquoted, as redis-py does)."""

    tls: bool
    host: str
    port: int
    unix_socket_path: str | None
    database: int
    username: str | None
    password: str | None


def parse_redis_url(url: str) -> RedisUrl:
    """Take ``redis[s]://[user[:password]@]host[:port][/db]`` or ``unix://path`` apart.

    Raise ValueError for a bad port or database, or a query other than ``?db=N``; the
    message never quotes the URL (it may hold a password).
    """
    parts = urlsplit(url)
    if parts.scheme not in {"redis", "rediss", "unix"}:
        raise ValueError("must start with redis://, rediss:// or unix://")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("the port is not a number from 1 to 65535") from None
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"db"})
    if unknown:
        raise ValueError(f"unknown query parameter {', '.join(unknown)} (only db= is read)")
    unix = parts.scheme == "unix"
    raw_db = query["db"][0] if "db" in query else ("" if unix else parts.path.lstrip("/"))
    if raw_db and not raw_db.isdigit():
        raise ValueError("the database (path or ?db=) is not a number")
    if unix and not parts.path:
        raise ValueError("unix:// needs the socket's path")
    if not unix and not parts.hostname:
        raise ValueError("needs a host")
    return RedisUrl(
        tls=parts.scheme == "rediss",
        host=parts.hostname or "localhost",
        port=port,
        unix_socket_path=parts.path if unix else None,
        database=int(raw_db or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def _tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS keywords, for a rediss:// URL: the server's certificate is verified."""
    return {
        "ssl": True,
        "ssl_cert_reqs": "required",
        "ssl_ca_certs": _path(settings.redis_tls_ca_file),
        "ssl_certfile": _path(settings.redis_tls_cert_file),
        "ssl_keyfile": _path(settings.redis_tls_key_file),
        "ssl_check_hostname": settings.redis_tls_check_hostname,
    }


def _path(value: object) -> str | None:
    return None if value is None else str(value)


def _connection_options(settings: Settings, url: RedisUrl) -> dict[str, Any]:
    """What every connection to a data node takes: credentials, database, TLS, timeouts."""
    options: dict[str, Any] = {
        "username": url.username,
        "password": url.password,
        "db": url.database,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": settings.redis_timeout_s,
    }
    if url.tls:
        options.update(_tls_options(settings))
    return options


class _SentinelPool(SentinelConnectionPool):
    """Closing the client closes its connections to the sentinels too."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        # Also called, with inuse_connections=False, when the master moved: a sentinel
        # query under way elsewhere is left alone then.
        await super().disconnect(inuse_connections)
        await asyncio.gather(
            *(
                sentinel.connection_pool.disconnect(inuse_connections)
                for sentinel in self.sentinel_manager.sentinels
            )
        )


def _sentinel(settings: Settings, url: RedisUrl) -> Sentinel:
    # The sentinels speak TLS when the data nodes do; their password is their own.
    sentinel_options: dict[str, Any] = {
        "socket_connect_timeout": SENTINEL_TIMEOUT_S,
        "socket_timeout": SENTINEL_TIMEOUT_S,
    }
    if settings.redis_sentinel_password is not None:
        sentinel_options["password"] = settings.redis_sentinel_password.get_secret_value()
    if url.tls:
        sentinel_options.update(_tls_options(settings))
    return Sentinel(  # type: ignore[no-untyped-call]
        list(settings.sentinels),
        sentinel_kwargs=sentinel_options,
        **_connection_options(settings, url),
    )


def arq_redis_settings(settings: Settings) -> RedisSettings:
    """ARQ's RedisSettings for a worker that opens its own pool.

    In Sentinel mode ARQ passes neither the CA nor a client certificate to the master's
    connections: the services hand ARQ a pool from ``connect_arq`` instead.
    """
    url = parse_redis_url(settings.redis_url)
    sentinels = settings.sentinels
    return RedisSettings(
        host=list(sentinels) if sentinels else url.host,
        port=url.port,
        unix_socket_path=url.unix_socket_path,
        database=url.database,
        username=url.username,
        password=url.password,
        ssl=url.tls,
        ssl_ca_certs=_path(settings.redis_tls_ca_file) if url.tls else None,
        ssl_certfile=_path(settings.redis_tls_cert_file) if url.tls else None,
        ssl_keyfile=_path(settings.redis_tls_key_file) if url.tls else None,
        ssl_cert_reqs="required",
        ssl_check_hostname=settings.redis_tls_check_hostname if url.tls else False,
        sentinel=bool(sentinels),
        sentinel_master=settings.redis_sentinel_service,
    )


def redis_client(
    settings: Settings,
    *,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    socket_timeout_s: float | None = None,
    health_check_interval_s: int = 0,
) -> Redis:
    """A redis-py client of the Redis in the settings (it connects on first use).

    ``socket_timeout_s``: how long a command waits for its answer (REDIS_TIMEOUT_S when
    None)."""
    url = parse_redis_url(settings.redis_url)
    options = _connection_options(settings, url)
    options["socket_connect_timeout"] = connect_timeout_s
    if socket_timeout_s is not None:
        options["socket_timeout"] = socket_timeout_s
    options["health_check_interval"] = health_check_interval_s
    if settings.sentinels:
        client: Redis = _sentinel(settings, url).master_for(
            settings.redis_sentinel_service, connection_pool_class=_SentinelPool, **options
        )
        return client
    return Redis(host=url.host, port=url.port, unix_socket_path=url.unix_socket_path, **options)


async def connect_arq(settings: Settings) -> ArqRedis:
    """Open ARQ's pool and ping it: a Redis error if Redis is away, RedisMisconfigured if it
    refuses our credentials or certificate."""
    try:
        url = parse_redis_url(settings.redis_url)
        # Built here rather than by ARQ's create_pool, whose connections have no command
        # timeout (RedisSettings has none to give); pinged once below, since our callers
        # retry with their own backoff, listening for signals.
        pool: ArqRedis
        if settings.sentinels:
            pool = _sentinel(settings, url).master_for(
                settings.redis_sentinel_service,
                redis_class=ArqRedis,
                connection_pool_class=_SentinelPool,
                **_connection_options(settings, url),
            )
        else:
            pool = ArqRedis(
                host=url.host,
                port=url.port,
                unix_socket_path=url.unix_socket_path,
                **_connection_options(settings, url),
            )
        pool.default_queue_name = settings.arq_queue_name
        try:
            await pool.ping()
        except BaseException:
            await pool.aclose()
            raise
        return pool
    except Exception as error:
        raise_if_misconfigured(error, settings)
        raise


async def check_redis(client: Redis, settings: Settings) -> None:
    """Ping ``client``; raise RedisMisconfigured if Redis refuses our credentials or
    certificate, and let any other Redis error through (Redis may just be away)."""
    try:
        await client.ping()
    except Exception as error:
        raise_if_misconfigured(error, settings)
        raise


def raise_if_misconfigured(error: BaseException, settings: Settings) -> None:
    """Raise RedisMisconfigured, naming the setting to fix, if ``error`` is one retrying
    cannot cure: credentials refused, or a certificate that does not verify."""
    reason = _misconfiguration(error, settings)
    if reason is not None:
        raise RedisMisconfigured(reason) from None


def _misconfiguration(error: BaseException, settings: Settings) -> str | None:
    url = parse_redis_url(settings.redis_url)
    if isinstance(error, AuthenticationError) or (
        isinstance(error, ResponseError) and str(error).startswith(("WRONGPASS", "NOAUTH"))
    ):
        who = f"user {url.username!r}" if url.username else "the default user"
        given = "a password" if url.password else "no password"
        return (
            f"Redis refused the credentials of REDIS_URL ({who}, {given}): {error}; "
            "set redis://user:password@host (percent-encode special characters)"
        )
    if isinstance(error, MasterNotFoundError) and "AuthenticationError" in str(error):
        # Every sentinel refused us (their errors are only in the message).
        return (
            "the sentinels refused REDIS_SENTINEL_PASSWORD"
            + (" (unset)" if settings.redis_sentinel_password is None else "")
            + f": {error}"
        )
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            ca = settings.redis_tls_ca_file
            source = f"REDIS_TLS_CA_FILE={ca}" if ca else "the system CAs (REDIS_TLS_CA_FILE unset)"
            return (
                f"Redis's TLS certificate did not verify against {source}: "
                f"{getattr(cause, 'verify_message', None) or cause}"
                + (
                    " (REDIS_TLS_CHECK_HOSTNAME=false skips the name check)"
                    if "hostname" in str(cause).lower() or "IP address" in str(cause)
                    else ""
                )
            )
        cause = cause.__cause__ or cause.__context__
    return None
