"""Lanes drained of the legacy consistent-hash routing (worker/tasks/upgrade.py).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "routing_drains",
        sa.Column("partition", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("worker_id", sa.String(64), nullable=False),
        sa.Column("drained_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("partition", name="pk_routing_drains"),
    )


def downgrade() -> None:
    op.drop_table("routing_drains")
