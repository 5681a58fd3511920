"""Operations carry the mark of first steps not yet known sent, in the status index's second column.

``execute()`` used to write an outbox row next to each operation's row. The operation's row now says itself that
its first steps may still need sending (``first_steps_since``, with their countdown), and the relay finds such
operations through the index on (status, first_steps_since), which replaces the index on status alone. Outbox
rows written before this revision stay where they are and are sent or deleted as before.

Revision ID: 0003_operations_first_steps
Revises: 0002_operations_finished_at
Create Date: 2026-12-07 18:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_operations_first_steps"
down_revision: str | Sequence[str] | None = "0002_operations_finished_at"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NEW_COLUMNS = (
    sa.Column("first_steps_since", sa.DateTime(), nullable=True),
    sa.Column("first_steps_delay_ms", sa.Integer(), nullable=True),
)


def upgrade() -> None:
    # A database that create_all made from newer models than 0001_initial's, then adopted by migrate() at
    # 0001_initial, has the columns and the index already.
    present = {column["name"] for column in sa.inspect(op.get_bind()).get_columns("operations")}
    for column in _NEW_COLUMNS:
        if column.name not in present:
            op.add_column("operations", column)  # nullable: SQLite adds it in place, and running code ignores it
    op.create_index(
        "ix_operations_status_first_steps",
        "operations",
        ["status", "first_steps_since"],
        unique=False,
        if_not_exists=True,
    )
    op.drop_index(op.f("ix_operations_status"), table_name="operations", if_exists=True)


def downgrade() -> None:
    op.create_index(op.f("ix_operations_status"), "operations", ["status"], unique=False)
    op.drop_index("ix_operations_status_first_steps", table_name="operations")
    with op.batch_alter_table("operations") as batch:
        for column in reversed(_NEW_COLUMNS):
            batch.drop_column(column.name)
