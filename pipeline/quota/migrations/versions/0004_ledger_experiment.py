"""usage_ledger.experiment and .variant: the model experiment that chose a job's preset.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable with no default: a job no experiment touched has none, and rows written before
    # experiments existed are exactly such jobs. A plain ALTER on both backends; existing rows
    # are not rewritten.
    op.add_column("usage_ledger", sa.Column("experiment", sa.String(length=64), nullable=True))
    op.add_column("usage_ledger", sa.Column("variant", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite older than 3.35 has no DROP COLUMN, so Alembic copies the table there
    # (indexes and constraints included); PostgreSQL gets a plain ALTER TABLE ... DROP COLUMN.
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("variant")
        batch.drop_column("experiment")
