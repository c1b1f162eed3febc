"""Indexes for the retention purge; when the reconciler last looked at a run.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from tasks.db import Time

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Index the creation times the purge walks; add the runs' `reconciled_at`."""
    op.create_index("ix_batch_items_created_at", "batch_items", ["created_at"])
    op.create_index("ix_data_items_created_at", "data_items", ["created_at"])
    op.add_column("batch_runs", sa.Column("reconciled_at", Time))


def downgrade() -> None:
    """Drop them."""
    op.drop_column("batch_runs", "reconciled_at")
    op.drop_index("ix_data_items_created_at", "data_items")
    op.drop_index("ix_batch_items_created_at", "batch_items")
