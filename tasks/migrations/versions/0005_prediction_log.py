"""The prediction log and the drift checks.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from tasks.db import Id, Json, Time

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the prediction log and the drift checks, indexed by model and time."""
    op.create_table(
        "prediction_log",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("uid", sa.String(24), nullable=False),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("source", sa.String(8), nullable=False),
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("latency_ms", sa.Double),
        sa.Column("row_count", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(40), nullable=False),
        sa.Column("inputs", Json),
        sa.Column("outputs", Json, nullable=False),
        sa.Column("outlier", sa.Boolean, nullable=False),
        sa.Column("outliers", Json),
        sa.PrimaryKeyConstraint("id", name="pk_prediction_log"),
        sa.UniqueConstraint("uid", name="uq_prediction_log_uid"),
    )
    op.create_index("ix_prediction_log_model_created_at", "prediction_log", ["model", "created_at"])
    op.create_index("ix_prediction_log_created_at", "prediction_log", ["created_at"])
    op.create_index("ix_prediction_log_request_id", "prediction_log", ["request_id"])
    op.create_table(
        "drift_checks",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("model", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("row_count", sa.Integer, nullable=False),
        sa.Column("threshold", sa.Double, nullable=False),
        sa.Column("psi", Json, nullable=False),
        sa.Column("worst", sa.Double, nullable=False),
        sa.Column("alert", sa.Boolean, nullable=False),
        sa.Column("checked_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_drift_checks"),
    )
    op.create_index("ix_drift_checks_model_version_id", "drift_checks", ["model", "version", "id"])
    op.create_index("ix_drift_checks_checked_at", "drift_checks", ["checked_at"])


def downgrade() -> None:
    """Drop them."""
    op.drop_table("drift_checks")
    op.drop_table("prediction_log")
