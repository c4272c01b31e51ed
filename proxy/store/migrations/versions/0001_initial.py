"""Initial schema: predictions and attempts.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00

Written by hand to match proxy/store/models.py exactly (tests/test_store.py
checks with alembic's compare_metadata on SQLite and PostgreSQL). Timestamps
are plain DateTime(timezone=True) here; models.UTCDateTime only acts at bind
and result time.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "predictions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=True),
        sa.Column("outputs", sa.JSON(), nullable=True),
        sa.Column("has_nsfw_contents", sa.JSON(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("error_kind", sa.String(length=32), nullable=True),
        sa.Column("cost_micro_usd", sa.BigInteger(), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("api_key_id", sa.String(length=64), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        _ts("created_at", nullable=False),
        _ts("started_at"),
        _ts("completed_at"),
        _ts("updated_at", nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        _ts("lease_expires_at"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_predictions_api_key_id", "predictions", ["api_key_id"])
    op.create_index("ix_predictions_status_id", "predictions", ["status", "id"])
    op.create_index("ix_predictions_lease", "predictions", ["status", "lease_expires_at"])

    op.create_table(
        "attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("prediction_id", sa.String(length=36), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("upstream_id", sa.String(length=128), nullable=True),
        sa.Column("poll_url", sa.String(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("error_kind", sa.String(length=32), nullable=True),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=True),
        sa.Column("cost_micro_usd", sa.BigInteger(), nullable=False),
        sa.Column("api_key_id", sa.String(length=64), nullable=True),
        _ts("created_at", nullable=False),
        _ts("completed_at"),
        sa.ForeignKeyConstraint(["prediction_id"], ["predictions.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("prediction_id", "seq", name="uq_attempts_prediction_seq"),
    )
    op.create_index("ix_attempts_prediction_id", "attempts", ["prediction_id"])


def downgrade() -> None:
    op.drop_index("ix_attempts_prediction_id", table_name="attempts")
    op.drop_table("attempts")
    op.drop_index("ix_predictions_lease", table_name="predictions")
    op.drop_index("ix_predictions_status_id", table_name="predictions")
    op.drop_index("ix_predictions_api_key_id", table_name="predictions")
    op.drop_table("predictions")
