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
    text,
)

__all__ = [
    "agents",
    "budgets",
    "group_ledger",
    "group_paths",
    "groups",
    "ledger",
    "metadata",
    "outbox",
    "partition_leases",
    "processed_commands",
    "reservations",
    "routing_drains",
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
    #: The agent's group, charged with it (NULL: in no group).
    Column("group_id", String(128), ForeignKey("groups.group_id"), nullable=True),
    Index("ix_agents_group_id", "group_id"),
)

#: Groups of agents (org → team → …). Usage is the sum of the members'
#: ledger effects since the group's last reset; NULL allocation: no limit.
groups = Table(
    "groups",
    metadata,
    Column("group_id", String(128), primary_key=True),
    Column("parent_id", String(128), ForeignKey("groups.group_id"), nullable=True),
    #: Levels from this group up to its root, itself included (1 for a root).
    Column("depth", Integer, nullable=False),
    Column("allocated_tokens", BigInteger, nullable=True),
    Column("used_tokens", BigInteger, nullable=False),
    Column("reserved_tokens", BigInteger, nullable=False),
    Column("thresholds", String(400), nullable=True),
    Column("period", String(8), nullable=True),
    Column("timezone", String(64), nullable=True),
    Column("period_start", DateTime(timezone=True), nullable=True),
    Column("resets_at", DateTime(timezone=True), nullable=True),
    #: Last row of the group's own ledger (allocations and resets).
    Column("ledger_seq", BigInteger, nullable=False),
    #: Bumped by every write: the compare-and-set of a batch's update.
    Column("version", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("allocated_tokens IS NULL OR allocated_tokens >= 0", name="allocated_ok"),
    CheckConstraint("used_tokens >= 0", name="used_non_negative"),
    CheckConstraint("reserved_tokens >= 0", name="reserved_non_negative"),
    CheckConstraint(
        "allocated_tokens IS NULL OR used_tokens + reserved_tokens <= allocated_tokens",
        name="held_within_allocated",
    ),
)

#: Every (ancestor, descendant) pair of groups, each group with itself at
#: depth 0: a member's whole chain in one indexed read.
group_paths = Table(
    "group_paths",
    metadata,
    Column("ancestor_id", String(128), ForeignKey("groups.group_id"), nullable=False),
    Column("descendant_id", String(128), ForeignKey("groups.group_id"), nullable=False),
    Column("depth", Integer, nullable=False),
    PrimaryKeyConstraint("descendant_id", "ancestor_id"),
    Index("ix_group_paths_ancestor_id", "ancestor_id"),
)

#: A group's own changes: allocations and period resets (its members'
#: charges are their ledger rows, which name the group).
group_ledger = Table(
    "group_ledger",
    metadata,
    Column("group_id", String(128), ForeignKey("groups.group_id"), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("allocated_after", BigInteger, nullable=False),
    Column("used_after", BigInteger, nullable=False),
    Column("reserved_after", BigInteger, nullable=False),
    Column("message_id", String(255), nullable=False),
    Column("period_start", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("group_id", "seq"),
    CheckConstraint("amount > 0", name="amount_positive"),
    Index(
        "uq_group_ledger_reset",
        "group_id",
        "message_id",
        unique=True,
        sqlite_where=text("kind = 'reset'"),
        postgresql_where=text("kind = 'reset'"),
    ),
)

budgets = Table(
    "budgets",
    metadata,
    Column("agent_id", String(128), ForeignKey("agents.agent_id"), primary_key=True),
    Column("allocated_tokens", BigInteger, nullable=False),
    Column("used_tokens", BigInteger, nullable=False),
    Column("ledger_seq", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    #: Held by open reservations (sum of their tokens).
    Column("reserved_tokens", BigInteger, nullable=False, server_default="0"),
    #: Comma-separated percents, ascending; NULL means the defaults (50,80,100).
    Column("thresholds", String(400), nullable=True),
    #: The budget's period (``set_period``), NULL for none; usage goes back
    #: to 0 at ``resets_at``, the end of the period that began at ``period_start``.
    Column("period", String(8), nullable=True),
    Column("timezone", String(64), nullable=True),
    Column("period_start", DateTime(timezone=True), nullable=True),
    Column("resets_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("allocated_tokens >= 0", name="allocated_non_negative"),
    CheckConstraint("used_tokens >= 0", name="used_non_negative"),
    CheckConstraint("used_tokens <= allocated_tokens", name="used_within_allocated"),
    CheckConstraint("reserved_tokens >= 0", name="reserved_non_negative"),
    CheckConstraint(
        "used_tokens + reserved_tokens <= allocated_tokens", name="held_within_allocated"
    ),
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
    Column("reserved_after", BigInteger, nullable=False, server_default="0"),
    #: The hold a reserve, release, expire, settle or commit row is about.
    Column("reservation_id", String(64), nullable=True),
    #: A reset row: the start of the period whose usage it sets back to 0.
    Column("period_start", DateTime(timezone=True), nullable=True),
    #: The agent's group when the row was applied: the groups it charged.
    Column("group_id", String(128), nullable=True),
    PrimaryKeyConstraint("agent_id", "seq"),
    CheckConstraint("amount > 0", name="amount_positive"),
    # A reset row's message_id names the period it opens: one per boundary.
    Index(
        "uq_ledger_reset",
        "agent_id",
        "message_id",
        unique=True,
        sqlite_where=text("kind = 'reset'"),
        postgresql_where=text("kind = 'reset'"),
    ),
)

#: Every hold, open or closed. Open ones are indexed by deadline (the
#: sweeper) and by agent (a batch loads its agents' open holds).
reservations = Table(
    "reservations",
    metadata,
    Column("reservation_id", String(64), primary_key=True),
    Column("agent_id", String(128), ForeignKey("agents.agent_id"), nullable=False),
    Column("tokens", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    #: The reserve's message_id.
    Column("message_id", String(255), nullable=False),
    Column("closed_at", DateTime(timezone=True), nullable=True),
    #: The commit's or release's message_id, or the expiry's ledger id.
    Column("closed_by", String(255), nullable=True),
    #: What the commit reported as used.
    Column("used_tokens", BigInteger, nullable=True),
    CheckConstraint("tokens > 0", name="tokens_positive"),
    CheckConstraint("status IN ('open', 'committed', 'released', 'expired')", name="status_known"),
    CheckConstraint("(status = 'open') = (closed_at IS NULL)", name="closed_when_not_open"),
    Index(
        "ix_reservations_open_deadline",
        "expires_at",
        sqlite_where=text("status = 'open'"),
        postgresql_where=text("status = 'open'"),
    ),
    Index(
        "ix_reservations_open_agent",
        "agent_id",
        sqlite_where=text("status = 'open'"),
        postgresql_where=text("status = 'open'"),
    ),
)

#: Events recorded in the transaction of the change they announce, published
#: afterwards by the worker that holds ``partition`` (worker/tasks/outbox.py).
outbox = Table(
    "outbox",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    #: The event's identity and its AMQP message_id: consumers deduplicate on it.
    Column("event_id", String(64), nullable=False, unique=True),
    Column("partition", Integer, nullable=True),
    Column("agent_id", String(128), nullable=False),
    Column("routing_key", String(255), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=True),
    Index(
        "ix_outbox_unpublished",
        "partition",
        "id",
        sqlite_where=text("published_at IS NULL"),
        postgresql_where=text("published_at IS NULL"),
    ),
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

#: Lanes emptied of what the legacy consistent-hash exchange routed, during the
#: upgrade to stable routing: once every partition is here, it is switched.
routing_drains = Table(
    "routing_drains",
    metadata,
    Column("partition", Integer, primary_key=True, autoincrement=False),
    Column("worker_id", String(64), nullable=False),
    Column("drained_at", Float, nullable=False),
)
