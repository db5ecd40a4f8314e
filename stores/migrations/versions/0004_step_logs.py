"""step_logs: a running step's output, line batches with their stream and time

Workers append batches while the step runs (``zw logs -f`` follows them); each line is
stored once. ``step_runs.logs`` keeps the whole text of finished steps written before this.

Revision ID: 0004_step_logs
Revises: 0003_store_info
Create Date: 2026-12-01 22:00:01.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_step_logs"
down_revision = "0003_store_info"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "step_logs",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "step_run_id",
            sa.String(36),
            sa.ForeignKey("step_runs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("stream", sa.String(8), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.UniqueConstraint("step_run_id", "attempt", "seq", name="uq_step_logs_seq"),
    )


def downgrade() -> None:
    op.drop_table("step_logs")
