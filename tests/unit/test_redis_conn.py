"""The Redis factory: REDIS_URL and the TLS/Sentinel settings into ARQ's and redis-py's terms.

What the connections do against real servers (TLS, ACL users, a failover) is in
tests/acceptance/test_redis_{tls,acl,sentinel}.py; here, what each setting turns into,
and that no error or log text shows a password.
"""

from __future__ import annotations

import dataclasses
import ssl
from pathlib import Path

import pytest
from arq.connections import RedisSettings
from pydantic import ValidationError
from redis.asyncio.sentinel import SentinelManagedSSLConnection
from redis.exceptions import AuthenticationError, ConnectionError, TimeoutError

from throttler.redis_conn import (
    RedisMisconfigured,
    arq_redis_settings,
    parse_redis_url,
    raise_if_misconfigured,
    redis_client,
)
from throttler.settings import Settings, describe_error, load_settings, redact_url

SECRET = "pa:ss@w/rd"
ENCODED = "pa%3Ass%40w%2Frd"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in Settings.model_fields:
        monkeypatch.delenv(field.upper(), raising=False)


@pytest.fixture
def pem(tmp_path: Path) -> Path:
    """A file to name (its content is not read until a connection opens)."""
    path = tmp_path / "file.pem"
    path.write_text("not read here\n")
    return path


def test_the_url_gives_user_password_host_port_and_database() -> None:
    url = parse_redis_url(f"rediss://app:{ENCODED}@redis.internal:6380/3")
    assert (url.tls, url.username, url.password) == (True, "app", SECRET)
    assert (url.host, url.port, url.database, url.unix_socket_path) == (
        "redis.internal",
        6380,
        3,
        None,
    )
    assert parse_redis_url("redis://h?db=2").database == 2
    assert parse_redis_url("redis://:only-password@h").username is None
    unix = parse_redis_url("unix:///run/redis.sock?db=1")
    assert (unix.unix_socket_path, unix.database, unix.tls) == ("/run/redis.sock", 1, False)


@pytest.mark.parametrize(
    ("url", "error"),
    [
        (f"redis://app:{ENCODED}@h:port/0", "port"),
        (f"redis://app:{ENCODED}@h/zero", "database"),
        (f"redis://app:{ENCODED}@h/0?ssl_cert_reqs=none", "unknown query parameter"),
        (f"redis://app:{ENCODED}@/0", "needs a host"),
    ],
)
def test_a_bad_url_stops_the_start_naming_redis_url_without_its_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str, error: str
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(SystemExit):
        load_settings()
    message = capsys.readouterr().err
    assert message.startswith("invalid setting REDIS_URL: ")
    assert error in message
    assert ENCODED not in message
    assert SECRET not in message
    assert "app:***@" in message


def test_redact_hides_only_the_password() -> None:
    assert redact_url(f"rediss://app:{ENCODED}@h:1/0") == "rediss://app:***@h:1/0"
    assert redact_url("redis://:pw@h") == "redis://:***@h"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_url("postgresql+asyncpg://u:pw@db/x") == "postgresql+asyncpg://u:***@db/x"


def test_the_sentinel_password_is_never_echoed() -> None:
    with pytest.raises(ValidationError) as error:
        Settings(redis_sentinel_password=["not", "a", "string"])
    assert "REDIS_SENTINEL_PASSWORD" in describe_error(error.value)
    assert "not" not in describe_error(error.value).split("(got", 1)[1]
    settings = Settings(redis_sentinel_password=SECRET)
    assert SECRET not in repr(settings)


def test_tls_settings_reach_arq(pem: Path) -> None:
    settings = Settings(
        redis_url=f"rediss://app:{ENCODED}@redis.internal:6380/2",
        redis_tls_ca_file=pem,
        redis_tls_cert_file=pem,
        redis_tls_key_file=pem,
    )
    arq = arq_redis_settings(settings)
    assert dataclasses.asdict(arq) == dataclasses.asdict(
        RedisSettings(
            host="redis.internal",
            port=6380,
            database=2,
            username="app",
            password=SECRET,  # unquoted: ARQ's own from_dsn would send the %-escapes
            ssl=True,
            ssl_ca_certs=str(pem),
            ssl_certfile=str(pem),
            ssl_keyfile=str(pem),
            ssl_cert_reqs="required",
            ssl_check_hostname=True,
        )
    )


def test_sentinels_reach_arq() -> None:
    settings = Settings(
        redis_url="redis://:pw@ignored:1/4",
        redis_sentinels="10.0.0.1:26379, [fd00::2]:26380",
        redis_sentinel_service="queue",
    )
    arq = arq_redis_settings(settings)
    assert arq.sentinel is True
    assert arq.host == [("10.0.0.1", 26379), ("fd00::2", 26380)]
    assert (arq.sentinel_master, arq.database, arq.password) == ("queue", 4, "pw")


async def test_a_sentinel_client_speaks_tls_to_the_master_and_the_sentinels(pem: Path) -> None:
    settings = Settings(
        redis_url="rediss://app:pw@ignored/0",
        redis_tls_ca_file=pem,
        redis_sentinels="127.0.0.1:1",
        redis_sentinel_password="sentinel-pw",
    )
    client = redis_client(settings)
    try:
        pool = client.connection_pool
        assert pool.connection_class is SentinelManagedSSLConnection
        assert pool.connection_kwargs["ssl_ca_certs"] == str(pem)
        assert pool.connection_kwargs["username"] == "app"
        sentinel = pool.sentinel_manager.sentinels[0]  # type: ignore[attr-defined]
        kwargs = sentinel.connection_pool.connection_kwargs
        assert (kwargs["password"], kwargs["ssl_ca_certs"]) == ("sentinel-pw", str(pem))
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("variable", "value", "error"),
    [
        ("REDIS_TLS_CA_FILE", "/no/such/ca.pem", "no such file"),
        ("REDIS_TLS_CERT_FILE", "{pem}", "needed with REDIS_TLS_CERT_FILE"),  # key missing
        ("REDIS_SENTINELS", "host-without-port", "not host:port"),
        ("REDIS_SENTINELS", "h:0", "not host:port"),
    ],
)
def test_bad_tls_or_sentinel_settings_stop_the_start(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    pem: Path,
    variable: str,
    value: str,
    error: str,
) -> None:
    monkeypatch.setenv("REDIS_URL", "rediss://h/0")
    monkeypatch.setenv(variable, value.format(pem=pem))
    with pytest.raises(SystemExit) as exit_info:
        load_settings()
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert error in message
    assert ("REDIS_TLS_KEY_FILE" if "CERT" in variable else variable) in message


def test_tls_files_need_a_rediss_url(pem: Path) -> None:
    with pytest.raises(ValidationError, match="needs a rediss:// REDIS_URL"):
        Settings(redis_url="redis://h/0", redis_tls_ca_file=pem)
    # Compose passes unset variables as "": unset, not the current directory.
    assert Settings(redis_url="redis://h/0", redis_tls_ca_file="").redis_tls_ca_file is None


def test_only_credential_and_certificate_errors_count_as_misconfiguration(pem: Path) -> None:
    settings = Settings(redis_url=f"redis://app:{ENCODED}@h/0")
    with pytest.raises(RedisMisconfigured) as refused:
        raise_if_misconfigured(AuthenticationError("invalid username-password pair"), settings)
    assert "REDIS_URL (user 'app', a password)" in str(refused.value)
    assert SECRET not in str(refused.value)
    assert ENCODED not in str(refused.value)
    for outage in (ConnectionError("Error 111 connecting"), TimeoutError(), OSError()):
        raise_if_misconfigured(outage, settings)  # Redis away: retried, not fatal

    tls = Settings(redis_url="rediss://h/0", redis_tls_ca_file=pem)
    try:
        try:
            raise ssl.SSLCertVerificationError(1, "certificate verify failed")
        except ssl.SSLError as cause:
            # What redis-py raises: a ConnectionError while handling the ssl error.
            raise ConnectionError("Error 1 connecting to h:6379") from cause
    except ConnectionError as wrapped:
        with pytest.raises(RedisMisconfigured, match=f"REDIS_TLS_CA_FILE={pem}"):
            raise_if_misconfigured(wrapped, tls)
