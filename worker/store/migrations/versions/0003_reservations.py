"""Reservations (holds), reserved tokens, usage thresholds and the event outbox.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _budgets_0002() -> sa.Table:
    """budgets as 0001 made it: SQLite rebuilds the table from this, not from
    reflection, so that no constraint is lost on the way."""
    return sa.Table(
        "budgets",
        sa.MetaData(),
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


def _budgets_0003() -> sa.Table:
    table = _budgets_0002()
    table.append_column(
        sa.Column("reserved_tokens", sa.BigInteger(), nullable=False, server_default="0")
    )
    table.append_column(sa.Column("thresholds", sa.String(400), nullable=True))
    table.append_constraint(
        sa.CheckConstraint("reserved_tokens >= 0", name="ck_budgets_reserved_non_negative")
    )
    table.append_constraint(
        sa.CheckConstraint(
            "used_tokens + reserved_tokens <= allocated_tokens",
            name="ck_budgets_held_within_allocated",
        )
    )
    return table


def upgrade() -> None:
    with op.batch_alter_table("budgets", copy_from=_budgets_0002()) as batch:
        batch.add_column(
            sa.Column("reserved_tokens", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("thresholds", sa.String(400), nullable=True))
        batch.create_check_constraint(
            op.f("ck_budgets_reserved_non_negative"), sa.text("reserved_tokens >= 0")
        )
        batch.create_check_constraint(
            op.f("ck_budgets_held_within_allocated"),
            sa.text("used_tokens + reserved_tokens <= allocated_tokens"),
        )
    # Plain ADD COLUMN: no constraint to add, so no table rebuild.
    op.add_column(
        "ledger", sa.Column("reserved_after", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.add_column("ledger", sa.Column("reservation_id", sa.String(64), nullable=True))
    op.create_table(
        "reservations",
        sa.Column("reservation_id", sa.String(64), nullable=False),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closed_by", sa.String(255), nullable=True),
        sa.Column("used_tokens", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("tokens > 0", name=op.f("ck_reservations_tokens_positive")),
        sa.CheckConstraint(
            "status IN ('open', 'committed', 'released', 'expired')",
            name=op.f("ck_reservations_status_known"),
        ),
        sa.CheckConstraint(
            "(status = 'open') = (closed_at IS NULL)",
            name=op.f("ck_reservations_closed_when_not_open"),
        ),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.agent_id"], name="fk_reservations_agent_id"),
        sa.PrimaryKeyConstraint("reservation_id", name="pk_reservations"),
    )
    open_only = sa.text("status = 'open'")
    op.create_index(
        "ix_reservations_open_deadline",
        "reservations",
        ["expires_at"],
        sqlite_where=open_only,
        postgresql_where=open_only,
    )
    op.create_index(
        "ix_reservations_open_agent",
        "reservations",
        ["agent_id"],
        sqlite_where=open_only,
        postgresql_where=open_only,
    )
    op.create_table(
        "outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=True),
        sa.Column("agent_id", sa.String(128), nullable=False),
        sa.Column("routing_key", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.UniqueConstraint("event_id", name="uq_outbox_event_id"),
    )
    op.create_index(
        "ix_outbox_unpublished",
        "outbox",
        ["partition", "id"],
        sqlite_where=sa.text("published_at IS NULL"),
        postgresql_where=sa.text("published_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    op.drop_table("outbox")
    op.drop_index("ix_reservations_open_agent", table_name="reservations")
    op.drop_index("ix_reservations_open_deadline", table_name="reservations")
    op.drop_table("reservations")
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("reservation_id")
        batch.drop_column("reserved_after")
    with op.batch_alter_table("budgets", copy_from=_budgets_0003()) as batch:
        batch.drop_constraint(op.f("ck_budgets_held_within_allocated"), type_="check")
        batch.drop_constraint(op.f("ck_budgets_reserved_non_negative"), type_="check")
        batch.drop_column("thresholds")
        batch.drop_column("reserved_tokens")
