"""workers.concurrency and workers.takeovers: what a worker can run at once, and how often it
took over a step whose process died

``zw queues`` and the scheduler's metrics divide a queue's demand by the concurrency of the
workers consuming it to say how many workers the queue wants; 0 means not reported (a
worker of an older release). ``takeovers`` counts the steps this worker took over after
their process was found dead (a recovery event, exported per worker).

Revision ID: 0005_worker_concurrency
Revises: 0004_step_logs
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_worker_concurrency"
down_revision = "0004_step_logs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch_alter_table: SQLite cannot add several columns in one ALTER otherwise.
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("concurrency", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("takeovers", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("takeovers")
        batch.drop_column("concurrency")
