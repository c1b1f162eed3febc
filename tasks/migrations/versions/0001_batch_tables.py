"""Batch items and batch runs.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from tasks.db import Id, Input, Json, Time

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the two tables of the batch pattern and their indexes."""
    op.create_table(
        "batch_items",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("input", Input, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("prediction", Json),
        sa.Column("error", Json),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("run_id", Id),
        sa.Column("claim", sa.String(36)),
        sa.Column("leased_until", Time),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("started_at", Time),
        sa.Column("finished_at", Time),
        sa.PrimaryKeyConstraint("id", name="pk_batch_items"),
    )
    op.create_index("ix_batch_items_model_status_id", "batch_items", ["model", "status", "id"])
    op.create_table(
        "batch_runs",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("triggered_by", sa.String(200), nullable=False),
        sa.Column("period", sa.String(64)),
        sa.Column("active", sa.String(100)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("high_water", Id),
        sa.Column("total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("succeeded", sa.Integer, nullable=False, server_default="0"),
        sa.Column("failed", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", Json),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("started_at", Time),
        sa.Column("updated_at", Time),
        sa.Column("finished_at", Time),
        sa.PrimaryKeyConstraint("id", name="pk_batch_runs"),
        sa.UniqueConstraint("active", name="uq_batch_runs_active"),
        sa.UniqueConstraint("model", "period", name="uq_batch_runs_model_period"),
    )
    op.create_index("ix_batch_runs_model_id", "batch_runs", ["model", "id"])


def downgrade() -> None:
    """Drop both tables."""
    op.drop_table("batch_runs")
    op.drop_table("batch_items")
