"""The one settings object: every environment variable the components read."""

from __future__ import annotations

import os
import re
import sys
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from throttler.limits import LimitRuleError, RuleSet
from throttler.redis_conn import parse_redis_url

DEFAULT_DATABASE_FILE = "arq_throttler.db"

NonNegativeFloat = Annotated[float, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
# Who may read /openapi.json, /docs and /redoc: anyone, holders of an API key, or nobody.
DocsAccess = Literal["public", "protected", "off"]


class Settings(BaseSettings):
    """Configuration read once from the environment (names are the upper-cased fields)."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    # Storage
    database_url: str = f"sqlite+aiosqlite:///{DEFAULT_DATABASE_FILE}"
    database_pool_size: int = Field(default=10, ge=1)
    database_timeout_s: PositiveFloat = 5.0
    # DATABASE_URL names a PgBouncer in transaction pooling mode (throttler.db): no
    # prepared statement outlives its transaction. Said, not detected: see the README.
    database_pgbouncer: bool = False
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"
    # Credentials (``redis://user:password@host``) come in the URL; see throttler.redis_conn.
    redis_url: str = "redis://127.0.0.1:6379/0"
    # TLS (a rediss:// URL): the CA bundle that signs the server's certificate (unset: the
    # system's), this client's certificate and key when the server asks for one, and
    # whether the certificate must name the host connected to.
    redis_tls_ca_file: Path | None = None
    redis_tls_cert_file: Path | None = None
    redis_tls_key_file: Path | None = Field(default=None, validate_default=True)
    redis_tls_check_hostname: bool = True
    # Sentinel: ``host:port,host:port``; when set, REDIS_URL's host is not used (its scheme,
    # credentials and database are) and the master of REDIS_SENTINEL_SERVICE is asked for.
    redis_sentinels: str = ""
    redis_sentinel_service: str = Field(default="mymaster", min_length=1)
    redis_sentinel_password: SecretStr | None = None
    # How long one Redis command of the relay or the worker may wait for its answer: a
    # Redis that stops answering (a network cut that drops packets, a stalled server)
    # raises a timeout, which the loops retry, instead of holding them until TCP gives up.
    redis_timeout_s: PositiveFloat = 10.0
    arq_queue_name: str = Field(default="arq:queue", min_length=1)

    # API
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_max_body_bytes: int = Field(default=65_536, ge=1024)
    api_keys: str = ""
    # Keys of API_KEYS that may also read every account (``?account=``) and, later, change
    # limits; after api_keys, so its validator sees the parsed keys.
    api_admin_keys: str = ""
    # Unset (or empty): "protected" when API_KEYS is set, else "public"; see docs_access.
    api_docs: DocsAccess | None = None
    # Request heads (api.http_limits): size of the whole head and of one line, and the time
    # a head may take to arrive; then how long an idle keep-alive connection stays open.
    api_max_header_bytes: int = Field(default=16_384, ge=1024)
    api_max_header_line_bytes: int = Field(default=8_192, ge=256)
    api_header_timeout_s: PositiveFloat = 10.0
    api_keep_alive_s: int = Field(default=5, ge=1)
    # API processes serving the one port (api.workers), each with its own group committer.
    api_workers: int = Field(default=1, ge=1)

    # Relay
    relay_rate: NonNegativeFloat = 0.0
    relay_burst: int = Field(default=1, ge=1)
    relay_max_inflight: int = Field(default=0, ge=0)
    relay_limits: str = ""
    relay_max_queue_depth: int = Field(default=0, ge=0)
    relay_batch_size: int = Field(default=1000, ge=1, le=10_000)
    relay_poll_interval_s: PositiveFloat = 0.05
    relay_claim_lease_s: PositiveFloat = 15.0
    # Port serving this relay's own metrics (relay.metrics); 0: none.
    relay_metrics_port: int = Field(default=0, ge=0, le=65535)

    # Recovery and housekeeping (run by the relay process)
    reconcile_interval_s: PositiveFloat = 5.0
    retention_days: int = Field(default=0, ge=0)

    # Worker
    worker_concurrency: int = Field(default=100, ge=1)
    worker_poll_delay_s: PositiveFloat = 0.01
    worker_max_tries: int = Field(default=5, ge=1)
    worker_retry_backoff_s: NonNegativeFloat = 1.0
    worker_retry_backoff_max_s: NonNegativeFloat = 300.0
    worker_keep_result_s: int = Field(default=3600, ge=0)
    worker_shutdown_grace_s: NonNegativeFloat = 30.0
    worker_lease_s: float = Field(default=3.0, ge=0.5)
    task_timeout_s: PositiveFloat = 300.0
    # Port serving this worker's own metrics (worker.metrics); 0: none.
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)

    # Download task
    download_allow_private: bool = False
    download_max_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    download_timeout_s: PositiveFloat = 30.0
    download_max_redirects: int = Field(default=5, ge=0)

    # Upstream backpressure (a 429/503, or a task raising taskkit.Backpressure)
    upstream_default_pause_s: NonNegativeFloat = 30.0
    upstream_max_pause_s: NonNegativeFloat = 3600.0
    upstream_max_pushbacks: int = Field(default=50, ge=0)

    # Metrics (GET /metrics on the API): how old its cached cluster view may get before a
    # scrape starts a refresh, and how many values of each ``*`` rule get their own series.
    metrics_refresh_s: PositiveFloat = 5.0
    metrics_top_scopes: int = Field(default=20, ge=0)

    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @field_validator("database_pgbouncer")
    @classmethod
    def _pgbouncer_on_postgres(cls, value: bool, info: ValidationInfo) -> bool:
        url = info.data.get("database_url")
        if value and url is not None and not url.startswith("postgresql+asyncpg://"):
            raise ValueError("is for PostgreSQL only: DATABASE_URL is not postgresql+asyncpg://")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        parse_redis_url(value)  # host, port, database and query checked at start
        return value

    @field_validator(
        "redis_tls_ca_file",
        "redis_tls_cert_file",
        "redis_tls_key_file",
        "redis_sentinel_password",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose passes an unset variable as "": unset.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file")
    @classmethod
    def _tls_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if info.field_name == "redis_tls_key_file" and "redis_tls_cert_file" in info.data:
            # redis-py loads a client certificate only with its key: both or neither.
            if value is None and info.data["redis_tls_cert_file"] is not None:
                raise ValueError("needed with REDIS_TLS_CERT_FILE (its private key)")
            if value is not None and info.data["redis_tls_cert_file"] is None:
                raise ValueError("needs REDIS_TLS_CERT_FILE (the certificate of this key)")
        if value is None:
            return None
        url = info.data.get("redis_url")
        if url is not None and not url.startswith("rediss://"):
            raise ValueError("needs a rediss:// REDIS_URL (TLS)")
        if not value.is_file():
            raise ValueError("no such file")
        if not os.access(value, os.R_OK):
            raise ValueError("not readable by this process")
        return value

    @field_validator("redis_sentinels")
    @classmethod
    def _sentinels_parse(cls, value: str, info: ValidationInfo) -> str:
        if parse_sentinels(value):
            url = info.data.get("redis_url")
            if url is not None and url.startswith("unix://"):
                raise ValueError("needs a redis:// or rediss:// REDIS_URL, not unix://")
        return value

    @field_validator("log_level", "sqlite_synchronous", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("api_keys")
    @classmethod
    def _api_keys_shape(cls, value: str) -> str:
        parse_api_keys(value)
        return value

    @field_validator("api_admin_keys")
    @classmethod
    def _admin_keys_are_api_keys(cls, value: str, info: ValidationInfo) -> str:
        admin = parse_admin_keys(value)
        if not admin:
            return value
        keys = info.data.get("api_keys")
        if keys is None:  # API_KEYS itself is invalid, and is reported on its own
            return value
        known = parse_api_keys(keys)
        if not known:
            # Without API_KEYS everything is open: an admin key would be silently unused.
            raise ValueError("needs API_KEYS: an admin key must also be one of API_KEYS")
        # An admin key is an ordinary key too, with its own account (whose tasks it lists
        # by default): so it must be one of API_KEYS. Entries named by position, not echoed.
        unknown = [str(n) for n, key in enumerate(admin, start=1) if key not in known]
        if unknown:
            raise ValueError(f"entry {', '.join(unknown)} is not a key of API_KEYS")
        return value

    @field_validator("api_docs", mode="before")
    @classmethod
    def _api_docs_value(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        value = value.strip().lower()
        # Compose passes an unset variable as "": the default then applies.
        if not value:
            return None
        # Without keys nobody could ever pass; failing at start beats silent 401s.
        keys = info.data.get("api_keys")
        if value == "protected" and keys is not None and not parse_api_keys(keys):
            raise ValueError("protected needs API_KEYS")
        return value

    @field_validator("relay_limits")
    @classmethod
    def _limits_parse(cls, value: str) -> str:
        # Parse at start so a malformed rule stops the process, quoting the rule.
        try:
            RuleSet.parse(value)
        except LimitRuleError as error:
            raise ValueError(str(error)) from None
        return value

    @property
    def limit_rules(self) -> RuleSet:
        """Every flow-control rule: RELAY_LIMITS plus the cluster shorthand variables."""
        # Not a cached_property: model_copy(update=...) would carry a stale parse along.
        return _parse_rules(
            self.relay_limits, self.relay_rate, self.relay_burst, self.relay_max_inflight
        )

    @cached_property
    def accounts_by_key(self) -> dict[str, str]:
        """Map each API key to its account (empty when authentication is off)."""
        return parse_api_keys(self.api_keys)

    @cached_property
    def admin_keys(self) -> tuple[str, ...]:
        """The API keys that may read every account (empty when there are none)."""
        return parse_admin_keys(self.api_admin_keys)

    @property
    def docs_access(self) -> DocsAccess:
        """API_DOCS, or its default: docs need a key exactly when the API does."""
        if self.api_docs is not None:
            return self.api_docs
        return "protected" if self.accounts_by_key else "public"

    @property
    def sentinels(self) -> tuple[tuple[str, int], ...]:
        """REDIS_SENTINELS as (host, port) pairs; empty: no Sentinel, REDIS_URL's host."""
        return parse_sentinels(self.redis_sentinels)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


@lru_cache(maxsize=16)
def _parse_rules(text: str, rate_per_s: float, burst: int, inflight: int) -> RuleSet:
    return RuleSet.parse(
        text, cluster_rate_per_s=rate_per_s, cluster_burst=burst, cluster_inflight=inflight
    )


def parse_api_keys(raw: str) -> dict[str, str]:
    """Parse ``key1:account1,key2:account2``; raise ValueError naming the bad entry."""
    keys: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, account = entry.partition(":")
        if not sep or not key.strip() or not account.strip():
            raise ValueError(f"entry {entry!r} is not key:account")
        keys[key.strip()] = account.strip()
    return keys


def parse_admin_keys(raw: str) -> tuple[str, ...]:
    """Parse ``key1,key2`` (blanks around entries and empty entries ignored)."""
    return tuple(dict.fromkeys(filter(None, (part.strip() for part in raw.split(",")))))


def parse_sentinels(raw: str) -> tuple[tuple[str, int], ...]:
    """Parse ``host:port,[v6]:port``; raise ValueError naming the bad entry."""
    sentinels: list[tuple[str, int]] = []
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        host, sep, port = entry.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"entry {entry!r} is not host:port")
        sentinels.append((host, int(port)))
    return tuple(sentinels)


# ``scheme://user:password@``: what a URL may carry that a log or an error must not show.
_URL_PASSWORD = re.compile(r"^(?P<head>[a-z][a-z0-9+.-]*://[^:/@]*):[^@/]*@", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Hide the password of ``scheme://user:password@host/...`` (``***``) for logs and errors."""
    return _URL_PASSWORD.sub(r"\g<head>:***@", url)


def describe_error(error: ValidationError) -> str:
    """Render a settings error as one line naming each environment variable.

    A URL's password is never shown; neither is REDIS_SENTINEL_PASSWORD.
    """
    parts = []
    for item in error.errors():
        variable = str(item["loc"][0]).upper() if item["loc"] else "settings"
        given = item.get("input")
        if variable == "REDIS_SENTINEL_PASSWORD":
            shown = "***"
        elif isinstance(given, str) and "://" in given:
            shown = repr(redact_url(given))
        else:
            shown = repr(given)
        parts.append(f"{variable}: {redact_url(item['msg'])} (got {shown})")
    return "invalid setting " + "; ".join(parts)


def load_settings() -> Settings:
    """Read the environment once; exit with a one-line message naming a bad variable."""
    try:
        return Settings()
    except ValidationError as error:
        print(describe_error(error), file=sys.stderr)
        raise SystemExit(2) from None


def sqlite_path(database_url: str) -> Path | None:
    """Return the file path of a SQLite URL, or None for other databases."""
    prefix = "sqlite+aiosqlite:///"
    if not database_url.startswith(prefix):
        return None
    return Path(database_url.removeprefix(prefix).split("?", 1)[0])
