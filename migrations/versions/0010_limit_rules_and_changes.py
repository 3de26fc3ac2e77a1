"""Limits as data: ``limit_rules`` (rules and pauses set through the API), ``limit_changes``

The environment's rules (``RELAY_LIMITS`` and the cluster shorthand) stay in each
process's environment and are not copied here: a row of ``limit_rules`` overrides the
environment's rule of its scope on every relay, and a row with neither a rate nor a cap
carries only a pause. ``limit_changes`` is the append-only history; relays reload the
rules when its ``max(id)`` moves.

Comments: on PostgreSQL ``create_table`` writes them to the catalog (``audit_columns``
reads it). SQLite has none: ``audit_columns`` is re-created with 0009's frozen comments
plus these tables', and the downgrade puts 0009's back.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29
"""

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies: a migration must not change when the models do.
JSON_DOCUMENT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
SCOPE_LENGTH = 300
ACCOUNT_LENGTH = 128
_UTC = " UTC (PostgreSQL timestamptz; SQLite text YYYY-MM-DD HH:MM:SS.ffffff, UTC, no offset)."

COMMENTS: dict[str, tuple[str, dict[str, str]]] = {
    "limit_rules": (
        "Limits set through the API (PUT /limits/{scope}, pause): one row per scope, "
        "overriding the RELAY_LIMITS rule of that scope on every relay within 1 s. The "
        "environment's rules are not rows (each process reads them at start). A row with "
        "rate_per_s and inflight both NULL carries only a pause. Every change is also a row of "
        "limit_changes.",
        {
            "scope": "The scope as a rule names it: cluster, task:<name>, account:<id>, "
            "host:<host> (canonical), or * in place of a value.",
            "rate_per_s": "Tasks per second of the token bucket; NULL: no rate.",
            "burst": "Depth of that bucket (>= 1); NULL without a rate.",
            "inflight": "Cap on the scope's tasks queued or running; NULL: none.",
            "paused_until": "Nothing of the scope is released before this moment; NULL or "
            "past: not paused." + _UTC,
            "updated_at": "When the row last changed." + _UTC,
            "updated_by": "Who changed it last: the account of the API key (limit_changes.by).",
        },
    ),
    "limit_changes": (
        "The history of limits set through the API: one row per change (set, delete, pause, "
        "resume), appended in the transaction that makes it; never updated. Relays reload "
        "the rules when max(id) moves.",
        {
            "id": "Append order.",
            "at": "When it was changed." + _UTC,
            "scope": "The scope changed (limit_rules.scope).",
            "change": "set (PUT), delete (DELETE: the environment's rule is in force again), "
            "pause, resume.",
            "before": "The scope's limit_rules row before (JSON: rate_per_s, burst, inflight, "
            "paused_until); NULL when there was none.",
            "after": "The row after, same shape; NULL when it was removed.",
            "reason": "api (an admin's request) or upstream (a 429/503 Retry-After).",
            "by": "Who: the account of the API key, or the task id.",
        },
    ),
}


def _audit_0009() -> ModuleType:
    """Migration 0009's module: its frozen comments and its audit_columns for SQLite."""
    path = Path(__file__).with_name("0009_audit_comments_and_views.py")
    spec = importlib.util.spec_from_file_location("_migration_0009", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sqlite_audit_columns(extra: dict[str, tuple[str, dict[str, str]]]) -> str:
    """0009's SQLite audit_columns body, listing ``extra``'s comments too."""
    audit = _audit_0009()
    frozen = audit._all_comments
    # 0009 builds the view from _all_comments(): give it these tables' comments too.
    setattr(audit, "_all_comments", lambda: {**frozen(), **extra})  # noqa: B010
    body: str = audit._sqlite_columns()
    return body


def _recreate_sqlite_audit_columns(extra: dict[str, tuple[str, dict[str, str]]]) -> None:
    bind = op.get_bind()
    bind.exec_driver_sql("DROP VIEW audit_columns")
    bind.exec_driver_sql(f"CREATE VIEW audit_columns AS {_sqlite_audit_columns(extra)}")


def _comment(table: str, column: str) -> str:
    return COMMENTS[table][1][column]


def upgrade() -> None:
    op.create_table(
        "limit_rules",
        sa.Column(
            "scope",
            sa.String(SCOPE_LENGTH),
            nullable=False,
            comment=_comment("limit_rules", "scope"),
        ),
        sa.Column(
            "rate_per_s", sa.Float(), nullable=True, comment=_comment("limit_rules", "rate_per_s")
        ),
        sa.Column("burst", sa.Integer(), nullable=True, comment=_comment("limit_rules", "burst")),
        sa.Column(
            "inflight", sa.Integer(), nullable=True, comment=_comment("limit_rules", "inflight")
        ),
        sa.Column(
            "paused_until", TIMESTAMP, nullable=True, comment=_comment("limit_rules", "paused_until")
        ),
        sa.Column(
            "updated_at", TIMESTAMP, nullable=False, comment=_comment("limit_rules", "updated_at")
        ),
        sa.Column(
            "updated_by",
            sa.String(ACCOUNT_LENGTH),
            nullable=False,
            comment=_comment("limit_rules", "updated_by"),
        ),
        sa.CheckConstraint("rate_per_s > 0", name=op.f("ck_limit_rules_rate_per_s")),
        sa.CheckConstraint("burst >= 1", name=op.f("ck_limit_rules_burst")),
        sa.CheckConstraint("inflight >= 1", name=op.f("ck_limit_rules_inflight")),
        sa.PrimaryKeyConstraint("scope", name=op.f("pk_limit_rules")),
        comment=COMMENTS["limit_rules"][0],
    )
    op.create_table(
        "limit_changes",
        sa.Column(
            "id",
            BIG_ID,
            autoincrement=True,
            nullable=False,
            comment=_comment("limit_changes", "id"),
        ),
        sa.Column("at", TIMESTAMP, nullable=False, comment=_comment("limit_changes", "at")),
        sa.Column(
            "scope",
            sa.String(SCOPE_LENGTH),
            nullable=False,
            comment=_comment("limit_changes", "scope"),
        ),
        sa.Column(
            "change", sa.String(16), nullable=False, comment=_comment("limit_changes", "change")
        ),
        sa.Column(
            "before", JSON_DOCUMENT, nullable=True, comment=_comment("limit_changes", "before")
        ),
        sa.Column("after", JSON_DOCUMENT, nullable=True, comment=_comment("limit_changes", "after")),
        sa.Column(
            "reason", sa.String(16), nullable=False, comment=_comment("limit_changes", "reason")
        ),
        sa.Column(
            "by", sa.String(ACCOUNT_LENGTH), nullable=False, comment=_comment("limit_changes", "by")
        ),
        sa.CheckConstraint(
            "change IN ('set', 'delete', 'pause', 'resume')", name=op.f("ck_limit_changes_change")
        ),
        sa.CheckConstraint("reason IN ('api', 'upstream')", name=op.f("ck_limit_changes_reason")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_limit_changes")),
        comment=COMMENTS["limit_changes"][0],
    )
    if op.get_bind().dialect.name == "sqlite":
        _recreate_sqlite_audit_columns(COMMENTS)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _recreate_sqlite_audit_columns({})
    op.drop_table("limit_changes")
    op.drop_table("limit_rules")
