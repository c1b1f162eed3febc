"""Raw inputs of the data-cache pattern.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from tasks.db import Blob, Time

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the table of stored inputs."""
    op.create_table(
        "data_items",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("content", Blob, nullable=False),
        sa.Column("content_type", sa.String(100), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_data_items"),
    )


def downgrade() -> None:
    """Drop it."""
    op.drop_table("data_items")
