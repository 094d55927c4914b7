"""The books, read back: an agent's ledger, and a reconciliation of every balance.

Both only read. ``reconcile`` does its sums in the database (GROUP BY), so it
costs one pass over the ledger whatever the number of agents.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from .tables import budgets, ledger, processed_commands

__all__ = ["Discrepancy", "LedgerEntry", "history", "reconcile"]

#: How each kind of ledger row moves a balance: (allocated, used) per token.
KIND_EFFECTS: dict[str, tuple[int, int]] = {"allocate": (1, 0), "consume": (0, 1)}


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    seq: int
    kind: str
    amount: int
    message_id: str
    allocated_after: int
    used_after: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Discrepancy:
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
        )
        .where(ledger.c.agent_id == agent_id)
        .order_by(ledger.c.seq)
    )
    if limit is not None:
        query = query.limit(limit)
    async with engine.connect() as conn:
        return [LedgerEntry(*row) for row in await conn.execute(query)]


def _sum_effect(column: int) -> ColumnElement[Any]:
    whens = [
        (ledger.c.kind == kind, ledger.c.amount * effect[column])
        for kind, effect in KIND_EFFECTS.items()
        if effect[column]
    ]
    return func.coalesce(func.sum(case(*whens, else_=literal(0))), 0)


async def reconcile(engine: AsyncEngine) -> list[Discrepancy]:
    """Every way the balances and the ledger disagree; empty when the books are exact."""
    found: list[Discrepancy] = []
    allocated_sum = _sum_effect(0).label("allocated_sum")
    used_sum = _sum_effect(1).label("used_sum")
    rows = func.count(ledger.c.seq).label("rows")
    last = func.coalesce(func.max(ledger.c.seq), 0).label("last")
    totals = (
        select(budgets.c.agent_id, allocated_sum, used_sum, rows, last)
        .select_from(budgets.outerjoin(ledger, ledger.c.agent_id == budgets.c.agent_id))
        .group_by(budgets.c.agent_id)
        .subquery()
    )
    mismatched = (
        select(
            budgets.c.agent_id,
            budgets.c.allocated_tokens,
            budgets.c.used_tokens,
            budgets.c.ledger_seq,
            totals.c.allocated_sum,
            totals.c.used_sum,
            totals.c.rows,
            totals.c.last,
        )
        .join(totals, totals.c.agent_id == budgets.c.agent_id)
        .where(
            or_(
                budgets.c.allocated_tokens != totals.c.allocated_sum,
                budgets.c.used_tokens != totals.c.used_sum,
                budgets.c.ledger_seq != totals.c.last,
                totals.c.rows != totals.c.last,
                budgets.c.used_tokens < 0,
                budgets.c.used_tokens > budgets.c.allocated_tokens,
            )
        )
        .order_by(budgets.c.agent_id)
    )
    last_rows = (
        select(budgets.c.agent_id, ledger.c.allocated_after, ledger.c.used_after)
        .join(
            ledger,
            and_(ledger.c.agent_id == budgets.c.agent_id, ledger.c.seq == budgets.c.ledger_seq),
        )
        .where(
            or_(
                ledger.c.allocated_after != budgets.c.allocated_tokens,
                ledger.c.used_after != budgets.c.used_tokens,
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
        .where(ledger.c.kind.in_(list(KIND_EFFECTS)))
        .order_by(ledger.c.agent_id, ledger.c.seq)
    )
    async with engine.connect() as conn:
        for agent, alloc, used, seq, alloc_sum, used_sum, count, top in await conn.execute(
            mismatched
        ):
            if alloc != alloc_sum:
                found.append(
                    Discrepancy(agent, "allocated_tokens = sum of ledger", alloc_sum, alloc)
                )
            if used != used_sum:
                found.append(Discrepancy(agent, "used_tokens = sum of ledger", used_sum, used))
            if seq != top:
                found.append(Discrepancy(agent, "ledger_seq = last ledger row", top, seq))
            if count != top:
                found.append(Discrepancy(agent, "ledger rows numbered 1..n", top, count))
            if not 0 <= used <= alloc:
                found.append(Discrepancy(agent, "0 <= used <= allocated", f"<= {alloc}", used))
        for agent, alloc_after, used_after in await conn.execute(last_rows):
            found.append(
                Discrepancy(agent, "balance = last ledger row", (alloc_after, used_after), "other")
            )
        for agent, count in await conn.execute(orphans):
            found.append(Discrepancy(agent, "ledger rows have a budget", 0, count))
        for agent, seq, message_id in await conn.execute(unrecorded):
            found.append(
                Discrepancy(agent, f"ledger row {seq} has a processed command", message_id, None)
            )
    return found
