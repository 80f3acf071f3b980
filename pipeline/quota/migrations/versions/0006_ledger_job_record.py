"""usage_ledger.request_hash, .request, .result, .error_message: the job's own record.

A job's state in the result backend expires with ``broker.result_expires`` (a day) while its
file is kept ``storage.retention_days``; these columns let ``get_job()`` and ``list_jobs()``
answer from the ledger for as long as the row lives, and keep a client ``job_id`` idempotent
(same request: the same job; another request: ``job_id_conflict``) past the claim's TTL.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: rows from before this revision have no record, and are read as
    # jobs whose request and result are not known. A plain ALTER; existing rows stay as they are.
    op.add_column("usage_ledger", sa.Column("request_hash", sa.String(length=64), nullable=True))
    op.add_column("usage_ledger", sa.Column("request", sa.JSON(), nullable=True))
    op.add_column("usage_ledger", sa.Column("result", sa.JSON(), nullable=True))
    op.add_column("usage_ledger", sa.Column("error_message", sa.Text(), nullable=True))


def downgrade() -> None:
    # Batch mode: SQLite older than 3.35 has no DROP COLUMN (see 0004).
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("error_message")
        batch.drop_column("result")
        batch.drop_column("request")
        batch.drop_column("request_hash")
