"""Every SQLite connection is set up alike: the engine's (aiosqlite) and the plain sqlite3
ones of the fast paths' threads (throttler.db.connect_sqlite).

A connection that missed a pragma would differ quietly: no foreign keys (orphan rows), no
busy timeout (a "database is locked" at once under contention), or checkpoints every
1,000 pages (the relay ~12 % slower).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from throttler.db import WAL_AUTOCHECKPOINT_PAGES, connect_sqlite, create_engine
from throttler.settings import Settings

PRAGMAS = ("journal_mode", "synchronous", "foreign_keys", "busy_timeout", "wal_autocheckpoint")


def _expected(settings: Settings) -> dict[str, object]:
    synchronous = {"OFF": 0, "NORMAL": 1, "FULL": 2, "EXTRA": 3}[settings.sqlite_synchronous]
    return {
        "journal_mode": "wal",
        "synchronous": synchronous,
        "foreign_keys": 1,
        "busy_timeout": int(settings.database_timeout_s * 1000),
        "wal_autocheckpoint": WAL_AUTOCHECKPOINT_PAGES,
    }


async def test_engine_and_thread_connections_share_their_set_up(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'setup.db'}",
        sqlite_synchronous="NORMAL",
        database_timeout_s=3.5,
    )
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            engine_pragmas = {
                name: (await connection.execute(text(f"PRAGMA {name}"))).scalar_one()
                for name in PRAGMAS
            }
    finally:
        await engine.dispose()
    plain = connect_sqlite(settings)
    try:
        thread_pragmas = {name: plain.execute(f"PRAGMA {name}").fetchone()[0] for name in PRAGMAS}
    finally:
        plain.close()
    assert engine_pragmas == _expected(settings)
    assert thread_pragmas == _expected(settings)
