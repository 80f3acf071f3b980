"""usage_ledger.batch_size: how many jobs shared the succeeded job's generate call.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable with no default: rows written before batching did not record a size, and
    # guessing 1 for them would pull `stats`' mean batch size down. Adding a nullable column
    # is a plain ALTER on both backends; existing rows are not rewritten.
    op.add_column("usage_ledger", sa.Column("batch_size", sa.Integer(), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite older than 3.35 has no DROP COLUMN, so Alembic copies the table there
    # (indexes and constraints included); PostgreSQL gets a plain ALTER TABLE ... DROP COLUMN.
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("batch_size")
