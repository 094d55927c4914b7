"""Budget periods: when usage goes back to 0, and the reset rows of the ledger.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable columns only: SQLite adds them in place, no table rebuild.
    with op.batch_alter_table("budgets", recreate="never") as batch:
        batch.add_column(sa.Column("period", sa.String(8), nullable=True))
        batch.add_column(sa.Column("timezone", sa.String(64), nullable=True))
        batch.add_column(sa.Column("period_start", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("resets_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("ledger", recreate="never") as batch:
        batch.add_column(sa.Column("period_start", sa.DateTime(timezone=True), nullable=True))
    # The last guard of "one reset per boundary": a reset row's message_id
    # names the period it opens.
    op.create_index(
        "uq_ledger_reset",
        "ledger",
        ["agent_id", "message_id"],
        unique=True,
        sqlite_where=sa.text("kind = 'reset'"),
        postgresql_where=sa.text("kind = 'reset'"),
    )


def downgrade() -> None:
    op.drop_index("uq_ledger_reset", table_name="ledger")
    with op.batch_alter_table("ledger", recreate="never") as batch:
        batch.drop_column("period_start")
    with op.batch_alter_table("budgets", recreate="never") as batch:
        for column in ("resets_at", "period_start", "timezone", "period"):
            batch.drop_column(column)
