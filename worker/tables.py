"""The database schema (SQLAlchemy Core). Alembic migrations create it."""

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

__all__ = [
    "agents",
    "budgets",
    "ledger",
    "metadata",
    "partition_leases",
    "processed_commands",
    "workers",
]

metadata = MetaData(
    naming_convention={
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
    }
)

agents = Table(
    "agents",
    metadata,
    Column("agent_id", String(128), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

budgets = Table(
    "budgets",
    metadata,
    Column("agent_id", String(128), ForeignKey("agents.agent_id"), primary_key=True),
    Column("allocated_tokens", BigInteger, nullable=False),
    Column("used_tokens", BigInteger, nullable=False),
    Column("ledger_seq", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("allocated_tokens >= 0", name="allocated_non_negative"),
    CheckConstraint("used_tokens >= 0", name="used_non_negative"),
    CheckConstraint("used_tokens <= allocated_tokens", name="used_within_allocated"),
)

#: Append-only: one row per change of a balance, numbered per agent.
ledger = Table(
    "ledger",
    metadata,
    Column("agent_id", String(128), ForeignKey("agents.agent_id"), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("message_id", String(255), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("allocated_after", BigInteger, nullable=False),
    Column("used_after", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    #: Who applied it, under which lease: the audit trail of fencing.
    Column("worker_id", String(64), nullable=True),
    Column("lease_partition", Integer, nullable=True),
    Column("lease_epoch", BigInteger, nullable=True),
    PrimaryKeyConstraint("agent_id", "seq"),
    CheckConstraint("amount > 0", name="amount_positive"),
)

#: The first outcome of every state-changing command, keyed by its message_id.
processed_commands = Table(
    "processed_commands",
    metadata,
    Column("message_id", String(255), primary_key=True),
    Column("agent_id", String(128), nullable=False),
    Column("command_type", String(32), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("reply", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_processed_commands_created_at", "created_at"),
)

#: Pool membership: each live worker process beats here (times are the
#: database's clock in epoch seconds, so that hosts' clocks never matter).
workers = Table(
    "workers",
    metadata,
    Column("worker_id", String(64), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
)

#: Who may apply a partition's commands. ``epoch`` is the fencing token: it
#: grows on every change of owner, and every batch checks it before commit.
partition_leases = Table(
    "partition_leases",
    metadata,
    Column("partition", Integer, primary_key=True, autoincrement=False),
    Column("owner", String(64), nullable=True),
    Column("epoch", BigInteger, nullable=False),
    Column("expires_at", Float, nullable=False),
)
