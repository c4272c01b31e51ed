"""Client API keys; images per attempt; indexes for spend queries.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 21:45:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("meta", sa.JSON(none_as_null=True), nullable=False),
        sa.Column("budget_micro_usd", sa.BigInteger(), nullable=True),
        sa.Column("budget_period", sa.String(length=8), nullable=True),
        sa.Column("rate_per_s", sa.Float(), nullable=True),
        sa.Column("burst", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_table(
        "proxy_meta",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("images", sa.Integer(), nullable=False, server_default="0"))
    op.create_index("ix_attempts_key_created", "attempts", ["api_key_id", "created_at"])
    op.create_index("ix_attempts_created", "attempts", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_attempts_created", table_name="attempts")
    op.drop_index("ix_attempts_key_created", table_name="attempts")
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("images")
    op.drop_table("proxy_meta")
    op.drop_table("api_keys")
