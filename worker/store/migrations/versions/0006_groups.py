"""Group budgets: groups, their closure table and ledger; agents' groups.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _moment(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "groups",
        sa.Column("group_id", sa.String(128), nullable=False),
        sa.Column("parent_id", sa.String(128), nullable=True),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("allocated_tokens", sa.BigInteger(), nullable=True),
        sa.Column("used_tokens", sa.BigInteger(), nullable=False),
        sa.Column("reserved_tokens", sa.BigInteger(), nullable=False),
        sa.Column("thresholds", sa.String(400), nullable=True),
        sa.Column("period", sa.String(8), nullable=True),
        sa.Column("timezone", sa.String(64), nullable=True),
        _moment("period_start", True),
        _moment("resets_at", True),
        sa.Column("ledger_seq", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        _moment("created_at"),
        _moment("updated_at"),
        sa.CheckConstraint(
            "allocated_tokens IS NULL OR allocated_tokens >= 0", name="ck_groups_allocated_ok"
        ),
        sa.CheckConstraint("used_tokens >= 0", name="ck_groups_used_non_negative"),
        sa.CheckConstraint("reserved_tokens >= 0", name="ck_groups_reserved_non_negative"),
        sa.CheckConstraint(
            "allocated_tokens IS NULL OR used_tokens + reserved_tokens <= allocated_tokens",
            name="ck_groups_held_within_allocated",
        ),
        sa.ForeignKeyConstraint(["parent_id"], ["groups.group_id"], name="fk_groups_parent_id"),
        sa.PrimaryKeyConstraint("group_id", name="pk_groups"),
    )
    op.create_table(
        "group_paths",
        sa.Column("ancestor_id", sa.String(128), nullable=False),
        sa.Column("descendant_id", sa.String(128), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["ancestor_id"], ["groups.group_id"], name="fk_group_paths_ancestor_id"
        ),
        sa.ForeignKeyConstraint(
            ["descendant_id"], ["groups.group_id"], name="fk_group_paths_descendant_id"
        ),
        sa.PrimaryKeyConstraint("descendant_id", "ancestor_id", name="pk_group_paths"),
    )
    op.create_index("ix_group_paths_ancestor_id", "group_paths", ["ancestor_id"])
    op.create_table(
        "group_ledger",
        sa.Column("group_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("allocated_after", sa.BigInteger(), nullable=False),
        sa.Column("used_after", sa.BigInteger(), nullable=False),
        sa.Column("reserved_after", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.String(255), nullable=False),
        _moment("period_start", True),
        _moment("created_at"),
        sa.CheckConstraint("amount > 0", name="ck_group_ledger_amount_positive"),
        sa.ForeignKeyConstraint(["group_id"], ["groups.group_id"], name="fk_group_ledger_group_id"),
        sa.PrimaryKeyConstraint("group_id", "seq", name="pk_group_ledger"),
    )
    op.create_index(
        "uq_group_ledger_reset",
        "group_ledger",
        ["group_id", "message_id"],
        unique=True,
        sqlite_where=sa.text("kind = 'reset'"),
        postgresql_where=sa.text("kind = 'reset'"),
    )
    # A nullable column: SQLite adds it in place, with its reference inline
    # (alembic would rebuild the table to add the constraint separately).
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "ALTER TABLE agents ADD COLUMN group_id VARCHAR(128) REFERENCES groups (group_id)"
        )
    else:
        op.add_column("agents", sa.Column("group_id", sa.String(128), nullable=True))
        op.create_foreign_key("fk_agents_group_id", "agents", "groups", ["group_id"], ["group_id"])
    op.create_index("ix_agents_group_id", "agents", ["group_id"])
    with op.batch_alter_table("ledger", recreate="never") as batch:
        batch.add_column(sa.Column("group_id", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ledger", recreate="never") as batch:
        batch.drop_column("group_id")
    op.drop_index("ix_agents_group_id", table_name="agents")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("group_id")
    op.drop_index("uq_group_ledger_reset", table_name="group_ledger")
    op.drop_table("group_ledger")
    op.drop_index("ix_group_paths_ancestor_id", table_name="group_paths")
    op.drop_table("group_paths")
    op.drop_table("groups")
