"""Read-only views of the database for ``budgetctl``: the database refuses writes.

SQLAlchemy is imported lazily by ``budgetctl`` through this module, so the
commands that only talk to the broker start fast.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from sqlalchemy import Float, cast, event, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from token_budget.worker.errors import NoDatabase, ViewError
from token_budget.worker.store.audit import (
    Discrepancy,
    LedgerEntry,
    PeriodUsage,
    history,
    period_usage,
    reconcile,
)
from token_budget.worker.store.db import is_sqlite, sqlite_path
from token_budget.worker.store.leases import PoolView, pool_view
from token_budget.worker.store.tables import agents, budgets, group_paths, groups

__all__ = [
    "BUSIEST_ORDERS",
    "GroupTree",
    "NoDatabase",
    "ViewError",
    "budgets_page",
    "busiest",
    "group_tree",
    "ledger_of",
    "periods_of",
    "pool",
    "read_only_engine",
    "reconciled",
]


@asynccontextmanager
async def read_only_engine(url: str) -> AsyncIterator[AsyncEngine]:
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise NoDatabase(path)
    if is_sqlite(url):
        engine = create_async_engine(url, poolclass=NullPool)

        @event.listens_for(engine.sync_engine, "connect")
        def _query_only(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA query_only=ON")
            cursor.close()
    else:
        settings = {"default_transaction_read_only": "on", "application_name": "budgetctl"}
        engine = create_async_engine(
            url, poolclass=NullPool, connect_args={"server_settings": settings}
        )
    try:
        yield engine
    except (SQLAlchemyError, OSError) as error:
        first = str(error).splitlines()[0][:300] if str(error) else repr(error)
        if "no such table" in first or ("relation" in first and "does not exist" in first):
            first += ": no schema yet (start the worker, it migrates; or `budget-worker migrate`)"
        raise ViewError(first) from error
    finally:
        await engine.dispose()


#: The balance columns every listing shows.
_BALANCE = (
    budgets.c.allocated_tokens,
    budgets.c.used_tokens,
    budgets.c.reserved_tokens,
    budgets.c.period,
    budgets.c.timezone,
    budgets.c.period_start,
    budgets.c.resets_at,
)


async def budgets_page(url: str, limit: int) -> list[dict[str, Any]]:
    """Agents and their balances, by agent id."""
    query = (
        select(agents.c.agent_id, *_BALANCE)
        .select_from(agents.outerjoin(budgets))
        .order_by(agents.c.agent_id)
        .limit(limit)
    )
    async with read_only_engine(url) as engine, engine.connect() as conn:
        rows = [dict(row) for row in (await conn.execute(query)).mappings()]
    return [_utc(row, "period_start", "resets_at") for row in rows]


#: ``busiest``'s orders: ``share``, the most of their allocation held (used or
#: reserved; an allocation of 0 counts as full); ``recent``, the latest change.
BUSIEST_ORDERS = ("share", "recent")


async def busiest(url: str, limit: int, by: str = "share") -> list[dict[str, Any]]:
    """The ``limit`` agents with a budget first ``by`` one of ``BUSIEST_ORDERS``,
    with ``budgets_page``'s columns and ``updated_at``; ties by agent id."""
    held = budgets.c.used_tokens + budgets.c.reserved_tokens
    share = func.coalesce(cast(held, Float) / func.nullif(budgets.c.allocated_tokens, 0), 1.0)
    orders = {
        "share": (share.desc(), held.desc()),
        "recent": (budgets.c.updated_at.desc(),),
    }
    if by not in orders:
        raise ValueError(f"order {by!r} is none of {', '.join(BUSIEST_ORDERS)}")
    query = (
        select(budgets.c.agent_id, *_BALANCE, budgets.c.updated_at)
        .order_by(*orders[by], budgets.c.agent_id)
        .limit(limit)
    )
    async with read_only_engine(url) as engine, engine.connect() as conn:
        rows = [dict(row) for row in (await conn.execute(query)).mappings()]
    return [_utc(row, "period_start", "resets_at", "updated_at") for row in rows]


def _utc(row: dict[str, Any], *names: str) -> dict[str, Any]:
    for name in names:
        if row[name] is not None and row[name].tzinfo is None:
            row[name] = row[name].replace(tzinfo=UTC)  # SQLite: naive, stored as UTC
    return row


async def ledger_of(url: str, agent_id: str, limit: int | None) -> list[LedgerEntry] | None:
    """The agent's ledger, oldest first; None if no such agent is registered."""
    query = select(agents.c.agent_id).where(agents.c.agent_id == agent_id)
    async with read_only_engine(url) as engine:
        async with engine.connect() as conn:
            if (await conn.execute(query)).first() is None:
                return None
        return await history(engine, agent_id, limit=limit)


async def periods_of(url: str, agent_id: str) -> tuple[list[PeriodUsage], str | None] | None:
    """The agent's usage per period and its time zone; None if not registered."""
    query = (
        select(agents.c.agent_id, budgets.c.period_start, budgets.c.timezone)
        .select_from(agents.outerjoin(budgets))
        .where(agents.c.agent_id == agent_id)
    )
    async with read_only_engine(url) as engine:
        async with engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        entries = await history(engine, agent_id)
    _, start, timezone = row
    if start is not None and start.tzinfo is None:
        start = start.replace(tzinfo=UTC)  # SQLite: naive, stored as UTC
    return period_usage(entries, start), timezone


async def reconciled(url: str) -> list[Discrepancy]:
    async with read_only_engine(url) as engine:
        return await reconcile(engine)


async def pool(url: str, member_ttl: float) -> PoolView:
    async with read_only_engine(url) as engine:
        return await pool_view(engine, member_ttl)


@dataclass(frozen=True, slots=True)
class GroupTree:
    """Groups with their depth under the tree's top (0), and their members."""

    #: group_id, parent_id, depth, allocated_tokens, used_tokens, reserved_tokens;
    #: by group id.
    groups: list[dict[str, Any]]
    #: agent_id, group_id and its balances (None: no budget yet); by agent id.
    agents: list[dict[str, Any]]


async def group_tree(url: str, root: str | None) -> GroupTree | None:
    """Every group (or ``root`` and those under it) and the agents in them, as
    stored; None if ``root`` is no group."""
    if root is None:
        depth = (groups.c.depth - 1).label("depth")
        selected = select(groups.c.group_id, groups.c.parent_id, depth)
    else:
        selected = select(groups.c.group_id, groups.c.parent_id, group_paths.c.depth).join(
            group_paths, group_paths.c.descendant_id == groups.c.group_id
        )
        selected = selected.where(group_paths.c.ancestor_id == root)
    group_query = selected.add_columns(
        groups.c.allocated_tokens, groups.c.used_tokens, groups.c.reserved_tokens
    ).order_by(groups.c.group_id)
    async with read_only_engine(url) as engine, engine.connect() as conn:
        found = [dict(row) for row in (await conn.execute(group_query)).mappings()]
        if root is not None and not found:
            return None
        member_query = (
            select(
                agents.c.agent_id,
                agents.c.group_id,
                budgets.c.allocated_tokens,
                budgets.c.used_tokens,
                budgets.c.reserved_tokens,
            )
            .select_from(agents.outerjoin(budgets))
            .order_by(agents.c.agent_id)
        )
        if root is None:
            member_query = member_query.where(agents.c.group_id.is_not(None))
        else:
            member_query = member_query.where(
                agents.c.group_id.in_(
                    select(group_paths.c.descendant_id).where(group_paths.c.ancestor_id == root)
                )
            )
        members = [dict(row) for row in (await conn.execute(member_query)).mappings()]
    return GroupTree(found, members)
