"""A PostgreSQL role that owns nothing, for running the services as in production.

Tests and probes connect as a superuser, on whom ``REVOKE`` has no effect; a service run
as an ``AppRole`` holds only what it was granted on one database's tables and sequences,
so revoking its writes (or making its sessions read-only) reproduces what an operator's
mistake or a failover does to a real deployment.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import create_async_engine

# What the services need on every table: the API inserts, relay and worker update, the
# relay and the retention pass delete.
TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"
# The writes a revoke takes away in the tests and probes (issue 9, item 6).
REVOKED_WRITES = "INSERT, UPDATE"
_END_SESSIONS = text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :name")


@dataclass(frozen=True, kw_only=True, slots=True)
class AppRole:
    """A login role with the services' privileges on the database at ``admin_url``."""

    name: str
    admin_url: str  # a superuser's URL of the database the role works in

    @property
    def url(self) -> str:
        """``admin_url`` with this role as the user (local trust authentication)."""
        return (
            make_url(self.admin_url)
            .set(username=self.name, password=None)
            .render_as_string(hide_password=False)
        )

    async def execute(self, *statements: str, end_sessions: bool = False) -> None:
        """Run statements as the superuser on the role's database, each committed; with
        ``end_sessions``, first end the role's open sessions (their next connections then
        start afresh, as after a failover)."""
        engine = create_async_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                if end_sessions:
                    await connection.execute(_END_SESSIONS, {"name": self.name})
                for statement in statements:
                    await connection.execute(text(statement))
        finally:
            await engine.dispose()

    async def revoke_writes(self) -> None:
        await self.execute(
            f'REVOKE {REVOKED_WRITES} ON ALL TABLES IN SCHEMA public FROM "{self.name}"'
        )

    async def grant_writes(self) -> None:
        await self.execute(
            f'GRANT {REVOKED_WRITES} ON ALL TABLES IN SCHEMA public TO "{self.name}"'
        )

    async def set_read_only(self, read_only: bool) -> None:
        """Make the role's sessions read-only (or not), as a standby's are."""
        setting = "on" if read_only else "off"
        await self.execute(
            f'ALTER ROLE "{self.name}" SET default_transaction_read_only = {setting}',
        )
        # The role's open sessions keep their setting: end them, so that the next ones
        # take it, as the sessions of a server that became a standby would have ended.
        await self.execute(end_sessions=True)

    async def drop(self) -> None:
        """End the role's sessions, take back what it was granted, and drop it."""
        await self.execute(
            f'DROP OWNED BY "{self.name}"', f'DROP ROLE IF EXISTS "{self.name}"', end_sessions=True
        )


async def create_app_role(admin_url: str) -> AppRole:
    """Create a role with the services' privileges on ``admin_url``'s database."""
    role = AppRole(name=f"throttler_app_{uuid.uuid4().hex[:10]}", admin_url=admin_url)
    database = make_url(admin_url).database
    await role.execute(
        f'CREATE ROLE "{role.name}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE',
        f'GRANT CONNECT ON DATABASE "{database}" TO "{role.name}"',
        f'GRANT USAGE ON SCHEMA public TO "{role.name}"',
        f'GRANT {TABLE_PRIVILEGES} ON ALL TABLES IN SCHEMA public TO "{role.name}"',
        f'GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role.name}"',
    )
    return role
