"""The books, read back: an agent's ledger, and a reconciliation of every balance.

Both only read. ``reconcile`` does its sums in the database (GROUP BY), so it
costs one pass over the ledger whatever the number of agents, plus one over
the open reservations.
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from token_budget.worker.domain.groups import EFFECTS
from token_budget.worker.store.tables import (
    budgets,
    group_ledger,
    group_paths,
    groups,
    ledger,
    processed_commands,
    reservations,
)

__all__ = [
    "COMMAND_KINDS",
    "KIND_EFFECTS",
    "Discrepancy",
    "LedgerEntry",
    "PeriodUsage",
    "history",
    "period_usage",
    "reconcile",
]

#: How each kind of ledger row moves a balance: (allocated, used, reserved) per
#: token of its amount. A commit writes two rows: ``settle`` ends the hold
#: (its full amount), ``commit`` adds what was really used (if anything).
KIND_EFFECTS = EFFECTS
#: Kinds written by a recorded command. ``expire`` and ``reset`` rows are the
#: worker's own (message_ids ``expire:<reservation_id>``, ``reset:<period
#: start>``): an expiry is checked against its reservation, a reset against
#: the row before it.
COMMAND_KINDS = frozenset(KIND_EFFECTS) - {"expire", "reset"}


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One applied command as the ledger recorded it."""

    seq: int
    kind: str
    amount: int
    message_id: str
    allocated_after: int
    used_after: int
    created_at: datetime
    reserved_after: int = 0
    reservation_id: str | None = None
    #: A reset row: the start of the period whose usage it set back to 0.
    period_start: datetime | None = None


@dataclass(frozen=True, slots=True)
class Discrepancy:
    """A balance that disagrees with the sum of its ledger."""

    agent_id: str
    check: str
    expected: Any
    actual: Any

    def __str__(self) -> str:
        return f"{self.agent_id}: {self.check}: expected {self.expected}, found {self.actual}"


async def history(
    engine: AsyncEngine, agent_id: str, *, limit: int | None = None
) -> list[LedgerEntry]:
    """The agent's ledger in the order it was applied (oldest first)."""
    query = (
        select(
            ledger.c.seq,
            ledger.c.kind,
            ledger.c.amount,
            ledger.c.message_id,
            ledger.c.allocated_after,
            ledger.c.used_after,
            ledger.c.created_at,
            ledger.c.reserved_after,
            ledger.c.reservation_id,
            ledger.c.period_start,
        )
        .where(ledger.c.agent_id == agent_id)
        .order_by(ledger.c.seq)
    )
    if limit is not None:
        query = query.limit(limit)
    async with engine.connect() as conn:
        return [
            LedgerEntry(*row[:6], _utc(row[6]), *row[7:9], _utc_or_none(row[9]))
            for row in await conn.execute(query)
        ]


def _utc(moment: datetime) -> datetime:
    # SQLite hands datetimes back naive; every one we store is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else _utc(moment)


@dataclass(frozen=True, slots=True)
class PeriodUsage:
    """The tokens used in one period, summed from its consume and commit rows."""

    #: None for usage before the budget had a period.
    start: datetime | None
    used: int
    #: False for the period still running (or ended, not yet reset: the
    #: agent's next command writes its reset).
    closed: bool


def period_usage(entries: list[LedgerEntry], current_start: datetime | None) -> list[PeriodUsage]:
    """Each period's usage, oldest first: the ledger cut at its reset rows.

    A reset row names the period it closes; the rows after the last reset
    belong to ``current_start`` (the budget's running period, if any).
    """
    found: list[PeriodUsage] = []
    used = 0
    for entry in entries:
        if entry.kind == "reset":
            found.append(PeriodUsage(entry.period_start, used, closed=True))
            used = 0
        elif KIND_EFFECTS.get(entry.kind, (0, 0, 0))[1] > 0:
            used += entry.amount
    found.append(PeriodUsage(current_start, used, closed=False))
    return found


def _sum_effect(column: int, *, skip: frozenset[str] = frozenset()) -> ColumnElement[Any]:
    whens = [
        (ledger.c.kind == kind, ledger.c.amount * effect[column])
        for kind, effect in KIND_EFFECTS.items()
        if effect[column] and kind not in skip
    ]
    return func.coalesce(func.sum(case(*whens, else_=literal(0))), 0)


async def _group_discrepancies(conn: Any) -> list[Discrepancy]:
    """Each group's balance against its members' ledger rows and its own.

    ``used`` = the members' usage (sub-groups' included) less the group's
    resets; ``reserved`` = the members' holds; ``allocated`` = its allocations.
    An agent's own resets do not move its groups.
    """
    members = (
        select(
            group_paths.c.ancestor_id.label("group_id"),
            _sum_effect(1, skip=frozenset({"reset"})).label("used"),
            _sum_effect(2).label("reserved"),
        )
        .select_from(ledger.join(group_paths, group_paths.c.descendant_id == ledger.c.group_id))
        .group_by(group_paths.c.ancestor_id)
        .subquery()
    )

    def own(kind: str) -> ColumnElement[Any]:
        amount = case((group_ledger.c.kind == kind, group_ledger.c.amount), else_=literal(0))
        return func.coalesce(func.sum(amount), 0)

    books = (
        select(
            group_ledger.c.group_id,
            own("allocate").label("allocated"),
            own("reset").label("reset"),
            func.count().label("rows"),
            func.max(group_ledger.c.seq).label("last"),
        )
        .group_by(group_ledger.c.group_id)
        .subquery()
    )
    query = (
        select(
            groups.c.group_id,
            groups.c.allocated_tokens,
            groups.c.used_tokens,
            groups.c.reserved_tokens,
            groups.c.ledger_seq,
            func.coalesce(members.c.used, 0),
            func.coalesce(members.c.reserved, 0),
            func.coalesce(books.c.allocated, 0),
            func.coalesce(books.c.reset, 0),
            func.coalesce(books.c.rows, 0),
            func.coalesce(books.c.last, 0),
        )
        .select_from(
            groups.outerjoin(members, members.c.group_id == groups.c.group_id).outerjoin(
                books, books.c.group_id == groups.c.group_id
            )
        )
        .order_by(groups.c.group_id)
    )
    found: list[Discrepancy] = []
    for row in await conn.execute(query):
        gid, alloc, used, reserved, seq, m_used, m_reserved, b_alloc, b_reset, count, top = row
        checks = [
            ("group allocated_tokens = sum of its allocations", b_alloc, alloc or 0),
            ("group used_tokens = members' usage - resets", m_used - b_reset, used),
            ("group reserved_tokens = members' holds", m_reserved, reserved),
            ("group ledger_seq = last group ledger row", top, seq),
            ("group ledger rows numbered 1..n", top, count),
        ]
        found.extend(Discrepancy(gid, c, e, a) for c, e, a in checks if e != a)
        if alloc is not None and used + reserved > alloc:
            found.append(
                Discrepancy(gid, "group used + reserved <= allocated", alloc, used + reserved)
            )
    return found


async def reconcile(engine: AsyncEngine) -> list[Discrepancy]:
    """Every way the balances and the ledger disagree; empty when the books are exact."""
    found: list[Discrepancy] = []
    allocated_sum = _sum_effect(0).label("allocated_sum")
    used_sum = _sum_effect(1).label("used_sum")
    reserved_sum = _sum_effect(2).label("reserved_sum")
    rows = func.count(ledger.c.seq).label("rows")
    last = func.coalesce(func.max(ledger.c.seq), 0).label("last")
    totals = (
        select(budgets.c.agent_id, allocated_sum, used_sum, reserved_sum, rows, last)
        .select_from(budgets.outerjoin(ledger, ledger.c.agent_id == budgets.c.agent_id))
        .group_by(budgets.c.agent_id)
        .subquery()
    )
    mismatched = (
        select(
            budgets.c.agent_id,
            budgets.c.allocated_tokens,
            budgets.c.used_tokens,
            budgets.c.reserved_tokens,
            budgets.c.ledger_seq,
            totals.c.allocated_sum,
            totals.c.used_sum,
            totals.c.reserved_sum,
            totals.c.rows,
            totals.c.last,
        )
        .join(totals, totals.c.agent_id == budgets.c.agent_id)
        .where(
            or_(
                budgets.c.allocated_tokens != totals.c.allocated_sum,
                budgets.c.used_tokens != totals.c.used_sum,
                budgets.c.reserved_tokens != totals.c.reserved_sum,
                budgets.c.ledger_seq != totals.c.last,
                totals.c.rows != totals.c.last,
                budgets.c.used_tokens < 0,
                budgets.c.reserved_tokens < 0,
                budgets.c.used_tokens + budgets.c.reserved_tokens > budgets.c.allocated_tokens,
            )
        )
        .order_by(budgets.c.agent_id)
    )
    last_rows = (
        select(
            budgets.c.agent_id,
            ledger.c.allocated_after,
            ledger.c.used_after,
            ledger.c.reserved_after,
        )
        .join(
            ledger,
            and_(ledger.c.agent_id == budgets.c.agent_id, ledger.c.seq == budgets.c.ledger_seq),
        )
        .where(
            or_(
                ledger.c.allocated_after != budgets.c.allocated_tokens,
                ledger.c.used_after != budgets.c.used_tokens,
                ledger.c.reserved_after != budgets.c.reserved_tokens,
            )
        )
    )
    orphans = (
        select(ledger.c.agent_id, func.count())
        .select_from(ledger.outerjoin(budgets, budgets.c.agent_id == ledger.c.agent_id))
        .where(budgets.c.agent_id.is_(None))
        .group_by(ledger.c.agent_id)
    )
    unrecorded = (
        select(ledger.c.agent_id, ledger.c.seq, ledger.c.message_id)
        .select_from(
            ledger.outerjoin(
                processed_commands, processed_commands.c.message_id == ledger.c.message_id
            )
        )
        .where(processed_commands.c.message_id.is_(None))
        .where(ledger.c.kind.in_(sorted(COMMAND_KINDS)))
        .order_by(ledger.c.agent_id, ledger.c.seq)
    )
    held = (
        select(reservations.c.agent_id, func.sum(reservations.c.tokens).label("held"))
        .where(reservations.c.status == "open")
        .group_by(reservations.c.agent_id)
        .subquery()
    )
    holds_disagree = (
        select(budgets.c.agent_id, func.coalesce(held.c.held, 0), budgets.c.reserved_tokens)
        .select_from(budgets.outerjoin(held, held.c.agent_id == budgets.c.agent_id))
        .where(func.coalesce(held.c.held, 0) != budgets.c.reserved_tokens)
        .order_by(budgets.c.agent_id)
    )
    # An expiry row names a reservation that did expire, and by that very row.
    expired = and_(
        reservations.c.reservation_id == ledger.c.reservation_id,
        reservations.c.status == "expired",
        reservations.c.closed_by == ledger.c.message_id,
    )
    stray_expiries = (
        select(ledger.c.agent_id, ledger.c.seq, ledger.c.reservation_id)
        .select_from(ledger.outerjoin(reservations, expired))
        .where(ledger.c.kind == "expire")
        .where(reservations.c.reservation_id.is_(None))
        .order_by(ledger.c.agent_id, ledger.c.seq)
    )
    # A reset sets the whole usage the row before it left back to 0.
    before = ledger.alias("before")
    partial_resets = (
        select(ledger.c.agent_id, ledger.c.seq, before.c.used_after, ledger.c.amount)
        .select_from(
            ledger.outerjoin(
                before,
                and_(before.c.agent_id == ledger.c.agent_id, before.c.seq == ledger.c.seq - 1),
            )
        )
        .where(ledger.c.kind == "reset")
        .where(
            or_(
                before.c.seq.is_(None),
                before.c.used_after != ledger.c.amount,
                ledger.c.used_after != 0,
            )
        )
        .order_by(ledger.c.agent_id, ledger.c.seq)
    )
    async with engine.connect() as conn:
        found.extend(await _group_discrepancies(conn))
        for agent, seq, used_before, amount in await conn.execute(partial_resets):
            check = f"ledger row {seq} resets the usage before it"
            found.append(Discrepancy(agent, check, used_before, amount))
        for row in await conn.execute(mismatched):
            found.extend(_balance_discrepancies(tuple(row)))
        for agent, alloc_after, used_after, reserved_after in await conn.execute(last_rows):
            found.append(
                Discrepancy(
                    agent,
                    "balance = last ledger row",
                    (alloc_after, used_after, reserved_after),
                    "other",
                )
            )
        for agent, count in await conn.execute(orphans):
            found.append(Discrepancy(agent, "ledger rows have a budget", 0, count))
        for agent, seq, message_id in await conn.execute(unrecorded):
            found.append(
                Discrepancy(agent, f"ledger row {seq} has a processed command", message_id, None)
            )
        for agent, holding, reserved in await conn.execute(holds_disagree):
            found.append(
                Discrepancy(agent, "reserved_tokens = sum of open holds", holding, reserved)
            )
        for agent, seq, reservation_id in await conn.execute(stray_expiries):
            check = f"ledger row {seq} expires an expired hold"
            found.append(Discrepancy(agent, check, reservation_id, None))
    return found


def _balance_discrepancies(row: tuple[Any, ...]) -> list[Discrepancy]:
    agent, alloc, used, reserved, seq, alloc_sum, used_sum, reserved_sum, count, top = row
    found = []
    if alloc != alloc_sum:
        found.append(Discrepancy(agent, "allocated_tokens = sum of ledger", alloc_sum, alloc))
    if used != used_sum:
        found.append(Discrepancy(agent, "used_tokens = sum of ledger", used_sum, used))
    if reserved != reserved_sum:
        found.append(Discrepancy(agent, "reserved_tokens = sum of ledger", reserved_sum, reserved))
    if seq != top:
        found.append(Discrepancy(agent, "ledger_seq = last ledger row", top, seq))
    if count != top:
        found.append(Discrepancy(agent, "ledger rows numbered 1..n", top, count))
    if not 0 <= used <= alloc:
        found.append(Discrepancy(agent, "0 <= used <= allocated", f"<= {alloc}", used))
    if reserved < 0 or used + reserved > alloc:
        found.append(
            Discrepancy(agent, "0 <= used + reserved <= allocated", f"<= {alloc}", used + reserved)
        )
    return found
