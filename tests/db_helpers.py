"""Read what the worker wrote, through an engine of the test's own."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiosqlite
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.workload import Model
from token_budget.schemas import LaneMap
from token_budget.worker.store.audit import reconcile
from token_budget.worker.store.db import create_engine, sqlite_path
from token_budget.worker.store.tables import budgets, ledger, processed_commands

__all__ = [
    "assert_books_in_order_on_own_lanes",
    "balances",
    "install_poison_trigger",
    "lane_blocked",
    "lanes_applied_on",
    "ledger_ids",
    "ledger_size",
    "processed_ids",
    "reader",
]


@asynccontextmanager
async def reader(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def balances(engine: AsyncEngine) -> dict[str, tuple[int, int]]:
    """agent_id -> (allocated_tokens, used_tokens)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(budgets.c.agent_id, budgets.c.allocated_tokens, budgets.c.used_tokens)
        )
        return {agent: (allocated, used) for agent, allocated, used in rows}


async def ledger_ids(engine: AsyncEngine) -> dict[str, list[str]]:
    """agent_id -> the message_ids of its ledger rows, in ledger (seq) order."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(ledger.c.agent_id, ledger.c.message_id).order_by(ledger.c.agent_id, ledger.c.seq)
        )
        result: dict[str, list[str]] = {}
        for agent, message_id in rows:
            result.setdefault(agent, []).append(message_id)
        return result


async def lanes_applied_on(engine: AsyncEngine) -> dict[str, set[int]]:
    """agent_id -> the lanes (lease partitions) its ledger rows were applied under."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(ledger.c.agent_id, ledger.c.lease_partition))
        found: dict[str, set[int]] = {}
        for agent, partition in rows:
            found.setdefault(agent, set()).add(partition)
        return found


async def ledger_size(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(ledger))).scalar_one())


async def processed_ids(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(processed_commands.c.message_id))
        return {message_id for (message_id,) in rows}


async def assert_books_in_order_on_own_lanes(
    engine: AsyncEngine, model: Model, partitions: int
) -> None:
    """Balances as modelled, every command once in published order, each agent
    applied on its own lane only, and the ledger reconciles."""
    assert await balances(engine) == model.balances()
    assert await ledger_ids(engine) == {a: ids for a, ids in model.applied.items() if ids}
    lanes = LaneMap(partitions)
    assert await lanes_applied_on(engine) == {
        agent: {lanes.index_of(agent)} for agent, ids in model.applied.items() if ids
    }
    assert await reconcile(engine) == []


@asynccontextmanager
async def lane_blocked(database_url: str, agent: str) -> AsyncIterator[None]:
    """Hold what the agent's next write needs, from outside the worker."""
    path = sqlite_path(database_url)
    if path is not None:
        # SQLite's one write lock: the lane's next commit waits (WAL readers do not).
        async with aiosqlite.connect(path, isolation_level=None) as db:
            await db.execute("BEGIN IMMEDIATE")
            yield
            await db.rollback()
        return
    engine: AsyncEngine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            # The lane locks the agent's budget row before it writes.
            await conn.execute(
                text("SELECT 1 FROM budgets WHERE agent_id = :a FOR UPDATE"), {"a": agent}
            )
            yield
    finally:
        await engine.dispose()


async def install_poison_trigger(engine: AsyncEngine) -> None:
    """Make the database itself refuse any ledger row of agent 'poison'."""
    async with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            await conn.execute(
                text(
                    "CREATE TRIGGER poison BEFORE INSERT ON ledger WHEN NEW.agent_id = 'poison' "
                    "BEGIN SELECT RAISE(ABORT, 'poison'); END"
                )
            )
            return
        await conn.execute(
            text(
                "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'poison'; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER poison BEFORE INSERT ON ledger FOR EACH ROW "
                "WHEN (NEW.agent_id = 'poison') EXECUTE FUNCTION refuse_poison()"
            )
        )
