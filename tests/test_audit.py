"""History and reconciliation read the books back, and catch every kind of tampering."""

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support import unique
from token_budget.schemas import parse_command
from token_budget.worker.domain.outcomes import Envelope
from token_budget.worker.store.audit import history, reconcile
from token_budget.worker.store.service import BudgetService


def _envelope(body: str, message_id: str) -> Envelope:
    return Envelope(parse_command(body), message_id)


async def _seed(engine: AsyncEngine) -> str:
    agent = unique("agent")
    service = BudgetService(engine)
    await service.apply(
        [
            _envelope(f'{{"type":"register_agent","agent_id":"{agent}"}}', unique("m")),
            _envelope(f'{{"type":"allocate","agent_id":"{agent}","tokens":100}}', "alloc-" + agent),
            _envelope(f'{{"type":"consume","agent_id":"{agent}","tokens":30}}', "c1-" + agent),
            _envelope(f'{{"type":"consume","agent_id":"{agent}","tokens":500}}', "c2-" + agent),
            _envelope(f'{{"type":"consume","agent_id":"{agent}","tokens":5}}', "c3-" + agent),
        ]
    )
    return agent


async def test_history_lists_applied_changes_in_order(engine: AsyncEngine) -> None:
    agent = await _seed(engine)
    entries = await history(engine, agent)
    assert [(e.seq, e.kind, e.amount, e.message_id) for e in entries] == [
        (1, "allocate", 100, "alloc-" + agent),
        (2, "consume", 30, "c1-" + agent),
        (3, "consume", 5, "c3-" + agent),
    ]
    assert (entries[-1].allocated_after, entries[-1].used_after) == (100, 35)


async def test_reconcile_is_clean_after_normal_operation(engine: AsyncEngine) -> None:
    await _seed(engine)
    await _seed(engine)
    assert await reconcile(engine) == []


async def test_reconcile_reports_a_balance_changed_behind_the_ledger(engine: AsyncEngine) -> None:
    agent = await _seed(engine)
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE budgets SET used_tokens = used_tokens + 1 WHERE agent_id = :a"),
            {"a": agent},
        )
    checks = {d.check for d in await reconcile(engine) if d.agent_id == agent}
    assert "used_tokens = sum of ledger" in checks
    assert "balance = last ledger row" in checks


async def test_reconcile_reports_a_deleted_ledger_row(engine: AsyncEngine) -> None:
    agent = await _seed(engine)
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM ledger WHERE agent_id = :a AND seq = 2"), {"a": agent})
    checks = {d.check for d in await reconcile(engine) if d.agent_id == agent}
    assert {"used_tokens = sum of ledger", "ledger rows numbered 1..n"} <= checks


async def test_reconcile_reports_a_ledger_row_without_its_command(engine: AsyncEngine) -> None:
    agent = await _seed(engine)
    async with engine.begin() as conn:
        await conn.execute(
            text("DELETE FROM processed_commands WHERE message_id = :m"), {"m": "c1-" + agent}
        )
    found = [d for d in await reconcile(engine) if d.agent_id == agent]
    assert [d.check for d in found] == ["ledger row 2 has a processed command"]
