"""Team collaboration: shared stacks, run origins, single-flight caching, cache expiry, lost objects

- ``stacks``: stack records a team shares (components as JSON; secrets only as references
  to environment variables or files, never their values), private to ``owner`` until shared.
- ``runs.origin``: what a run came from (``{"kind": "retry" | "rerun" | "copy", "run_id": ...}``).
- ``cache_flights``: one row per cache key being computed; the step run that inserted it
  computes, identical steps elsewhere wait for its commit (``step_runs.waits_for``).
- ``step_runs.cache_expires_at``: after it, the step's outputs are no longer offered as a cache
  hit (``cache_expires_after``, ``zw cache clear``); NULL: never expires.
- ``artifacts.missing_at``: when the object was found gone from the artifact store.

Revision ID: 0006_team
Revises: 0005_worker_concurrency
Create Date: 2026-12-02 00:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_team"
down_revision = "0005_worker_concurrency"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stacks",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("owner", sa.String(255), nullable=False),
        sa.Column("shared", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("components", sa.JSON(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "cache_flights",
        sa.Column("cache_key", sa.String(80), primary_key=True),
        sa.Column("step_run_id", sa.String(36), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
    )
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("origin", sa.JSON(), nullable=True))
    with op.batch_alter_table("step_runs") as batch:
        batch.add_column(sa.Column("waits_for", sa.String(36), nullable=True))
        batch.add_column(sa.Column("cache_expires_at", sa.Float(), nullable=True))
        batch.create_index("ix_step_runs_cached_from", ["cached_from_step_run_id"])
        batch.create_index("ix_step_runs_waits_for", ["waits_for"])
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(sa.Column("missing_at", sa.Float(), nullable=True))
    op.create_index("ix_runs_user", "runs", ["user"])


def downgrade() -> None:
    op.drop_index("ix_runs_user", "runs")
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("missing_at")
    with op.batch_alter_table("step_runs") as batch:
        batch.drop_index("ix_step_runs_waits_for")
        batch.drop_index("ix_step_runs_cached_from")
        batch.drop_column("cache_expires_at")
        batch.drop_column("waits_for")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("origin")
    op.drop_table("cache_flights")
    op.drop_table("stacks")
