"""Agents, budgets, the ledger and processed commands.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agents",
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("agent_id", name="pk_agents"),
    )
    op.create_table(
        "budgets",
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("allocated_tokens", sa.BigInteger(), nullable=False),
        sa.Column("used_tokens", sa.BigInteger(), nullable=False),
        sa.Column("ledger_seq", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("allocated_tokens >= 0", name="ck_budgets_allocated_non_negative"),
        sa.CheckConstraint("used_tokens >= 0", name="ck_budgets_used_non_negative"),
        sa.CheckConstraint(
            "used_tokens <= allocated_tokens", name="ck_budgets_used_within_allocated"
        ),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.agent_id"], name="fk_budgets_agent_id"),
        sa.PrimaryKeyConstraint("agent_id", name="pk_budgets"),
    )
    op.create_table(
        "ledger",
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("allocated_after", sa.BigInteger(), nullable=False),
        sa.Column("used_after", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("worker_id", sa.String(64), nullable=True),
        sa.Column("lease_partition", sa.Integer(), nullable=True),
        sa.Column("lease_epoch", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("amount > 0", name="ck_ledger_amount_positive"),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.agent_id"], name="fk_ledger_agent_id"),
        sa.PrimaryKeyConstraint("agent_id", "seq", name="pk_ledger"),
    )
    op.create_table(
        "processed_commands",
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("command_type", sa.String(32), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("reply", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("message_id", name="pk_processed_commands"),
    )
    op.create_index("ix_processed_commands_created_at", "processed_commands", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_processed_commands_created_at", table_name="processed_commands")
    op.drop_table("processed_commands")
    op.drop_table("ledger")
    op.drop_table("budgets")
    op.drop_table("agents")
