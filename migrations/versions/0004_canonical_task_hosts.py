"""tasks.host: every spelling of an IP address rewritten to its one host: key

Before this revision tasks.host kept an IP literal as the URL spelled it ("127.1",
"0x7f000001", IPv6 without brackets). The relay counts in-flight tasks and leaves out
blocked hosts by this column, so a task still pending, queued or running under an old
spelling would escape the rule that now names its address (and an in-flight cap could be
exceeded during the upgrade). Rewritten for every row, finished ones too, so that the
relay status counts them under one key. Names are unchanged (already folded). A host the
new rules refuse (a name ending in a number) is left as it was: no rule can name it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# The one definition of the key, not a copy frozen here: this revision's job is to bring
# stored keys to what the intake writes.
from throttler.hosts import host_key

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TASKS = sa.table("tasks", sa.column("host", sa.String(253)))


def _new_key(old: str) -> str:
    try:
        return host_key(old)
    except ValueError:
        return old


def upgrade() -> None:
    bind = op.get_bind()
    # One statement per distinct spelling (few), each an index range: not one per row.
    hosts = bind.execute(sa.select(TASKS.c.host).where(TASKS.c.host.is_not(None)).distinct())
    for (old,) in hosts.all():
        new = _new_key(old)
        if new != old:
            bind.execute(sa.update(TASKS).where(TASKS.c.host == old).values(host=new))


def downgrade() -> None:
    # The older code reads the canonical keys as well as it read the spellings (its rules
    # could name neither "127.1" as 127.0.0.1 nor an IPv6 host), so nothing to undo.
    pass
