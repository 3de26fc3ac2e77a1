"""Settings: documented defaults, and one line naming the variable for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from throttler.settings import Settings, load_settings, parse_api_keys, sqlite_path


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test from an environment that sets no setting."""
    for field in Settings.model_fields:
        monkeypatch.delenv(field.upper(), raising=False)


INVALID = [
    ("RELAY_RATE", "-1"),
    ("RELAY_RATE", "abc"),
    ("RELAY_BURST", "0"),
    ("RELAY_BURST", "1.5"),
    ("RELAY_MAX_INFLIGHT", "-1"),
    ("RELAY_BATCH_SIZE", "0"),
    ("RELAY_POLL_INTERVAL_S", "0"),
    ("RELAY_CLAIM_LEASE_S", "-5"),
    ("RELAY_MAX_QUEUE_DEPTH", "-1"),
    ("RELAY_LIMITS", "tenant:acme rate=1/s"),
    ("RELAY_LIMITS", "task:download rate=5/s; host:* burst=2"),
    ("RELAY_LIMITS", "task:nope inflight=1"),
    ("RELAY_LIMITS", "cluster:x rate=1/s"),
    ("RELAY_LIMITS", "host:* rate=0/s"),
    ("API_PORT", "70000"),
    ("API_PORT", "0"),
    ("API_MAX_BODY_BYTES", "10"),
    ("API_KEYS", "nocolon"),
    ("API_KEYS", "key:"),
    ("API_KEYS", "good:acct,:acct2"),
    ("DATABASE_URL", "mysql://x"),
    ("DATABASE_URL", "sqlite:///sync-driver.db"),
    ("DATABASE_URL", "postgresql://user@host/db"),
    ("DATABASE_POOL_SIZE", "0"),
    ("DATABASE_TIMEOUT_S", "0"),
    ("SQLITE_SYNCHRONOUS", "SOMETIMES"),
    ("REDIS_URL", "http://x"),
    ("ARQ_QUEUE_NAME", ""),
    ("WORKER_CONCURRENCY", "0"),
    ("WORKER_POLL_DELAY_S", "0"),
    ("WORKER_MAX_TRIES", "0"),
    ("WORKER_RETRY_BACKOFF_S", "-1"),
    ("WORKER_KEEP_RESULT_S", "-1"),
    ("TASK_TIMEOUT_S", "0"),
    ("DOWNLOAD_ALLOW_PRIVATE", "maybe"),
    ("DOWNLOAD_MAX_BYTES", "0"),
    ("DOWNLOAD_MAX_REDIRECTS", "-1"),
    ("LOG_LEVEL", "LOUD"),
]


@pytest.mark.parametrize(("variable", "value"), INVALID)
def test_invalid_setting_exits_2_with_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exit_info:
        load_settings()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    message = captured.err.rstrip("\n")
    assert "\n" not in message, f"expected one line, got {captured.err!r}"
    assert message.startswith("invalid setting ")
    assert variable in message
    assert repr(value) in message  # the message quotes the offending value


def test_several_invalid_settings_are_named_on_the_same_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAY_RATE", "-1")
    monkeypatch.setenv("RELAY_BURST", "0")
    with pytest.raises(SystemExit):
        load_settings()
    message = capsys.readouterr().err
    assert message.count("\n") == 1
    assert "RELAY_RATE" in message
    assert "RELAY_BURST" in message


def test_defaults_are_the_documented_ones() -> None:
    settings = load_settings()
    assert settings.database_url == "sqlite+aiosqlite:///arq_throttler.db"
    assert settings.is_sqlite
    assert sqlite_path(settings.database_url) == Path("arq_throttler.db")
    assert settings.database_pool_size == 10
    assert settings.database_timeout_s == 5.0
    assert settings.sqlite_synchronous == "FULL"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.arq_queue_name == "arq:queue"
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8000)
    assert settings.api_max_body_bytes == 65_536
    assert settings.api_keys == ""
    assert settings.accounts_by_key == {}
    assert settings.relay_rate == 0.0
    assert settings.relay_burst == 1
    assert settings.relay_max_inflight == 0
    assert settings.relay_limits == ""
    assert not settings.limit_rules
    assert settings.relay_max_queue_depth == 0
    assert settings.relay_batch_size == 1000
    assert settings.relay_poll_interval_s == 0.05
    assert settings.relay_claim_lease_s == 15.0
    assert settings.worker_concurrency == 100
    assert settings.worker_poll_delay_s == 0.01
    assert settings.worker_max_tries == 5
    assert settings.worker_retry_backoff_s == 1.0
    assert settings.worker_retry_backoff_max_s == 300.0
    assert settings.worker_keep_result_s == 3600
    assert settings.task_timeout_s == 300.0
    assert settings.download_allow_private is False
    assert settings.download_max_bytes == 10 * 1024 * 1024
    assert settings.download_timeout_s == 30.0
    assert settings.download_max_redirects == 5
    assert settings.log_level == "INFO"
    assert settings.model_fields_set == set()


def test_environment_is_read_once_with_upper_case_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_RATE", "2.5")
    monkeypatch.setenv("RELAY_BURST", "10")
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/1")
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://u@db/x")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    monkeypatch.setenv("DOWNLOAD_ALLOW_PRIVATE", "true")
    settings = load_settings()
    assert settings.relay_rate == 2.5
    assert settings.relay_burst == 10
    assert settings.redis_url == "redis://cache:6379/1"
    assert not settings.is_sqlite
    assert sqlite_path(settings.database_url) is None
    assert settings.log_level == "DEBUG"
    assert settings.download_allow_private is True
    # `make run` relies on this to tell a given REDIS_URL from the default.
    assert "redis_url" in settings.model_fields_set
    assert "relay_limits" not in settings.model_fields_set


def test_bad_relay_limits_quotes_the_rule(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAY_LIMITS", "task:download rate=5/s; account:* inflight=-1")
    with pytest.raises(SystemExit) as exit_info:
        load_settings()
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("invalid setting RELAY_LIMITS: ")
    assert "rule 'account:* inflight=-1'" in message


def test_limit_rules_include_the_cluster_shorthand(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_LIMITS", "host:* rate=1/s; cluster inflight=9")
    monkeypatch.setenv("RELAY_RATE", "4")
    monkeypatch.setenv("RELAY_BURST", "2")
    monkeypatch.setenv("RELAY_MAX_INFLIGHT", "12")
    rules = load_settings().limit_rules
    (cluster,) = rules.applicable(name="greeting", account="a")
    assert (cluster.limit.rate_per_s, cluster.limit.burst, cluster.limit.inflight) == (4.0, 2, 9)
    assert [
        str(applied.key)
        for applied in rules.applicable(name="download", account="a", host="Example.org")
    ] == ["cluster", "host:example.org"]


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.relay_rate = 5.0  # type: ignore[misc]


def test_sqlite_path_ignores_query_string() -> None:
    assert sqlite_path("sqlite+aiosqlite:////data/t.db?timeout=5") == Path("/data/t.db")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", {}),
        ("k1:a1", {"k1": "a1"}),
        ("k1:a1,k2:a2", {"k1": "a1", "k2": "a2"}),
        (" k1 : a1 , k2:a2 ,", {"k1": "a1", "k2": "a2"}),
        ("k1:acct:with:colons", {"k1": "acct:with:colons"}),
    ],
)
def test_parse_api_keys(raw: str, expected: dict[str, str]) -> None:
    assert parse_api_keys(raw) == expected


@pytest.mark.parametrize(
    ("raw", "bad_entry"),
    [("nocolon", "nocolon"), ("k1:", "k1:"), (":a1", ":a1"), ("k1:a1,bad", "bad"), (" : ", ":")],
)
def test_parse_api_keys_names_the_bad_entry(raw: str, bad_entry: str) -> None:
    with pytest.raises(ValueError, match="is not key:account") as error:
        parse_api_keys(raw)
    assert repr(bad_entry) in str(error.value)


def test_accounts_by_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "secret1:acme,secret2:globex")
    assert load_settings().accounts_by_key == {"secret1": "acme", "secret2": "globex"}


@pytest.mark.parametrize(
    ("keys", "api_docs", "access"),
    [
        ("", "", "public"),
        ("k:acct", "", "protected"),
        ("", "off", "off"),
        ("k:acct", "public", "public"),
        ("k:acct", " Protected ", "protected"),
        ("k:acct", "OFF", "off"),
    ],
)
def test_api_docs_defaults_to_protected_exactly_when_api_keys_is_set(
    monkeypatch: pytest.MonkeyPatch, keys: str, api_docs: str, access: str
) -> None:
    monkeypatch.setenv("API_KEYS", keys)
    monkeypatch.setenv("API_DOCS", api_docs)  # empty, as compose passes it: the default
    assert load_settings().docs_access == access


@pytest.mark.parametrize(("keys", "api_docs"), [("", "protected"), ("k:acct", "open")])
def test_bad_api_docs_exits_2_naming_api_docs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], keys: str, api_docs: str
) -> None:
    # Without keys "protected" would lock everyone out: refused at start, not at the door.
    monkeypatch.setenv("API_KEYS", keys)
    monkeypatch.setenv("API_DOCS", api_docs)
    with pytest.raises(SystemExit) as exit_info:
        load_settings()
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("invalid setting API_DOCS: "), message
    assert repr(api_docs) in message


@pytest.mark.parametrize(
    ("keys", "admin_keys", "expected"),
    [
        ("", "", ()),
        ("k1:acme", "", ()),
        ("k1:acme,k2:ops", "k2", ("k2",)),
        ("k1:acme,k2:ops", " k2 , k1 ,, k2", ("k2", "k1")),
    ],
)
def test_admin_keys(
    monkeypatch: pytest.MonkeyPatch, keys: str, admin_keys: str, expected: tuple[str, ...]
) -> None:
    monkeypatch.setenv("API_KEYS", keys)
    monkeypatch.setenv("API_ADMIN_KEYS", admin_keys)
    assert load_settings().admin_keys == expected


@pytest.mark.parametrize(
    ("keys", "admin_keys", "reason"),
    [
        # Without API_KEYS everything is open: an admin key would be silently meaningless.
        ("", "k2", "needs API_KEYS"),
        # An admin key is also an ordinary key with its own account.
        ("k1:acme", "k2", "entry 1 is not a key of API_KEYS"),
        ("k1:acme,k2:ops", "k2,k1,k3", "entry 3 is not a key of API_KEYS"),
        ("k1:acme", "acme", "entry 1 is not a key of API_KEYS"),  # an account is not a key
    ],
)
def test_bad_api_admin_keys_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    keys: str,
    admin_keys: str,
    reason: str,
) -> None:
    monkeypatch.setenv("API_KEYS", keys)
    monkeypatch.setenv("API_ADMIN_KEYS", admin_keys)
    with pytest.raises(SystemExit) as exit_info:
        load_settings()
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.rstrip("\n")
    assert "\n" not in message
    assert message.startswith("invalid setting API_ADMIN_KEYS: "), message
    assert reason in message


def test_a_bad_api_keys_is_reported_once_with_admin_keys_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("API_KEYS", "nocolon")
    monkeypatch.setenv("API_ADMIN_KEYS", "nocolon")
    with pytest.raises(SystemExit):
        load_settings()
    message = capsys.readouterr().err
    assert message.startswith("invalid setting API_KEYS: "), message
    assert "API_ADMIN_KEYS" not in message
