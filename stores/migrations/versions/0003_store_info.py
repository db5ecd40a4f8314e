"""store_info: the store's identity (a random store_id made once, at migration time)

A step message carries the store_id it was planned in, so a worker on another metadata
store refuses it by name instead of failing to find the run.

Revision ID: 0003_store_info
Revises: 0002_artifact_corrupted_at
Create Date: 2026-12-01 22:00:00.000000
"""

from __future__ import annotations

import time
import uuid

import sqlalchemy as sa
from alembic import op

revision = "0003_store_info"
down_revision = "0002_artifact_corrupted_at"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "store_info",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.bulk_insert(
        table, [{"key": "store_id", "value": str(uuid.uuid4()), "created_at": time.time()}]
    )


def downgrade() -> None:
    op.drop_table("store_info")
