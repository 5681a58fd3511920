"""An index on operations.finished_at, for the retention job that deletes ended operations by age.

Revision ID: 0002_operations_finished_at
Revises: 0001_initial
Create Date: 2026-12-06 04:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002_operations_finished_at"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A database that create_all made from newer models than 0001_initial's, then adopted by migrate() at
    # 0001_initial, has the index already.
    op.create_index(op.f("ix_operations_finished_at"), "operations", ["finished_at"], unique=False, if_not_exists=True)


def downgrade() -> None:
    op.drop_index(op.f("ix_operations_finished_at"), table_name="operations")
