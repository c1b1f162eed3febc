"""API keys of the web API.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from tasks.db import Id, Time

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the table of API keys."""
    op.create_table(
        "api_keys",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("scopes", sa.String(100), nullable=False),
        sa.Column("rate_limit", sa.String(64)),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("revoked_at", Time),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("token_hash", name="uq_api_keys_token_hash"),
    )


def downgrade() -> None:
    """Drop it."""
    op.drop_table("api_keys")
