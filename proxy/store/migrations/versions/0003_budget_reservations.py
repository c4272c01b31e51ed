"""Budget reservations in the database; what each attempt reserved and was quoted.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 23:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "budget_reservations",
        sa.Column("prediction_id", sa.String(length=36), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("api_key_id", sa.String(length=64), nullable=False),
        sa.Column("amount_micro_usd", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("prediction_id", "seq"),
    )
    op.create_index("ix_budget_reservations_api_key_id", "budget_reservations", ["api_key_id"])
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("reserved_micro_usd", sa.BigInteger(), nullable=False,
                                   server_default="0"))
        batch.add_column(sa.Column("quoted_micro_usd", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("quoted_micro_usd")
        batch.drop_column("reserved_micro_usd")
    op.drop_index("ix_budget_reservations_api_key_id", table_name="budget_reservations")
    op.drop_table("budget_reservations")
