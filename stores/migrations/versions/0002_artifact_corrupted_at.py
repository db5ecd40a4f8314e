"""artifacts.corrupted_at: a load found the bytes changed, so caching skips the artifact

Revision ID: 0002_artifact_corrupted_at
Revises: 0001_initial
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_artifact_corrupted_at"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: existing rows stay as they are and SQLite adds it in place.
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("corrupted_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_column("corrupted_at")
