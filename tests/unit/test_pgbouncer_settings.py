"""DATABASE_PGBOUNCER: off by default, changing nothing then; PostgreSQL only."""

from __future__ import annotations

import pytest

from throttler.db import pgbouncer_connect_args
from throttler.settings import Settings, load_settings

POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in Settings.model_fields:
        monkeypatch.delenv(field.upper(), raising=False)


def test_off_by_default_and_then_the_driver_keeps_its_caches() -> None:
    settings = Settings(database_url=POSTGRES)
    assert settings.database_pgbouncer is False
    assert pgbouncer_connect_args(settings) == {}


def test_on_no_statement_is_cached_or_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", POSTGRES)
    monkeypatch.setenv("DATABASE_PGBOUNCER", "true")
    arguments = pgbouncer_connect_args(load_settings())
    assert arguments["statement_cache_size"] == 0
    assert arguments["prepared_statement_cache_size"] == 0
    assert arguments["prepared_statement_name_func"]() == ""  # the unnamed statement


def test_on_sqlite_it_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_PGBOUNCER", "true")
    with pytest.raises(SystemExit) as exit_info:
        load_settings()
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("invalid setting DATABASE_PGBOUNCER: ")
    assert "PostgreSQL only" in error
