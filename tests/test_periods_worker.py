"""Budget periods over the broker: the SDK, budgetctl, and a worker killed on a boundary."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.amqp_helpers import Outgoing, connection_name, open_amqp
from tests.clock import Clock, SkewedClock
from tests.db_helpers import reader
from tests.eventually import eventually
from tests.inprocess import running
from tests.support import funded, unique
from tests.test_ctl import run_ctl
from token_budget.client import BudgetClient, InsufficientBudgetError
from token_budget.schemas import DEAD_LETTER_QUEUE, Consistency, Period
from token_budget.worker.app import Worker
from token_budget.worker.settings import Settings
from token_budget.worker.store.audit import reconcile
from token_budget.worker.store.tables import budgets, ledger

FAST_POOL = {"lease_ttl": 1.5, "member_ttl": 1.5, "renew_interval": 0.3}
NOON = datetime(2026, 12, 3, 12, 0, 30, tzinfo=UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOON)


@pytest.fixture
async def clocked(worker_settings: Settings, clock: Clock, amqp_url: str) -> Any:
    """A running worker on ``clock``, and a client."""
    async with (
        running(Worker(worker_settings, clock=clock)),
        BudgetClient.connect(amqp_url, timeout=20, name=connection_name()) as client,
    ):
        yield client


async def test_a_minute_budget_refuses_before_the_boundary_and_allows_in_full_after(
    clocked: BudgetClient, clock: Clock
) -> None:
    agent = await funded(clocked, 100)
    view = await clocked.set_period(agent, Period.MINUTE)
    assert view.resets_at == datetime(2026, 12, 3, 12, 1, tzinfo=UTC)
    await clocked.consume_and_wait(agent, 100)
    with pytest.raises(InsufficientBudgetError):
        await clocked.consume_and_wait(agent, 1)
    clock.advance(seconds=30)
    after = await clocked.consume_and_wait(agent, 100)
    assert (after.used_tokens, after.available_tokens) == (100, 0)


async def test_the_reply_says_when_the_budget_resets_in_its_own_time_zone(
    clocked: BudgetClient,
) -> None:
    agent = await funded(clocked, 100)
    await clocked.set_period(agent, "month", timezone="America/New_York")
    for consistency in (None, Consistency.COMMITTED):
        view = await clocked.get_budget(agent, consistency=consistency)
        assert view.period is Period.MONTH and view.timezone == "America/New_York"
        assert view.period_start is not None and view.resets_at is not None
        assert view.period_start.isoformat() == "2026-12-01T00:00:00-05:00"
        assert view.resets_at.isoformat() == "2027-01-01T00:00:00-05:00"


async def test_an_unknown_time_zone_is_answered_invalid_command_and_dead_lettered(
    clocked: BudgetClient, amqp_url: str
) -> None:
    agent = await funded(clocked, 100)
    body = {"type": "set_period", "agent_id": agent, "period": "day", "timezone": "Mars/Olympus"}
    async with open_amqp(amqp_url) as amqp:
        reply_to, replies = await amqp.reply_queue()
        await amqp.publish(
            Outgoing(json.dumps(body).encode(), agent, message_id="tz-1", reply_to=reply_to)
        )
        [reply] = await replies.wait_count(1)
        error = json.loads(reply.body)["error"]
        assert error["code"] == "invalid_command"
        assert "unknown time zone 'Mars/Olympus'" in json.dumps(error)
        dead = await eventually(
            lambda: amqp.take_all(DEAD_LETTER_QUEUE), within=20, what="the dead letter"
        )
        assert [m.message_id for m in dead] == ["tz-1"]
    assert (await clocked.get_budget(agent)).period is None


async def test_budgetctl_sets_a_period_shows_the_reset_and_sums_each_period(
    clocked: BudgetClient, clock: Clock, amqp_url: str, database_url: str
) -> None:
    env = {"BUDGET_AMQP_URL": amqp_url, "BUDGET_DATABASE_URL": database_url}
    agent = await funded(clocked, 100)
    run = await run_ctl("period", agent, "hour", "--timezone", "Asia/Kolkata", env=env)
    assert run.code == 0, run.err
    assert run.out.endswith("per hour (Asia/Kolkata), resets at 2026-12-03T18:00:00+05:30\n")
    await clocked.consume_and_wait(agent, 30)
    clock.advance(hours=1)
    await clocked.consume_and_wait(agent, 12)
    show = await run_ctl("show", agent, env=env)
    assert "resets at 2026-12-03T19:00:00+05:30" in show.out, show.err
    history = await run_ctl("history", agent, "--period", env=env)
    assert history.out.splitlines() == [
        "from 2026-12-03T17:00:00+05:30: used=30",
        "from 2026-12-03T18:00:00+05:30: used=12 (current)",
    ], history.err
    ledger_lines = (await run_ctl("history", agent, env=env)).out
    assert "reset" in ledger_lines and "(reset:2026-12-03T12:30:00Z)" in ledger_lines
    assert (await run_ctl("reconcile", env=env)).code == 0


@pytest.mark.slow
async def test_agents_across_a_boundary_are_reset_exactly_once_when_the_worker_is_killed_on_it(
    worker_process: Any, amqp_url: str, database_url: str, tmp_path: Path
) -> None:
    # The workers' clock is set so that the next minute boundary is a few
    # seconds away; it is the real clock moved, so time passes for them.
    real = datetime.now(UTC)
    boundary = real.replace(second=0, microsecond=0) + timedelta(minutes=5)
    offset = boundary - real - timedelta(seconds=15)
    workers_clock = SkewedClock(offset)
    start = {
        "module": "tests.skewed_worker",
        "test_clock_offset_seconds": offset.total_seconds(),
        "processes": 1,
        **FAST_POOL,
    }
    first = worker_process(**start)
    await first.wait_ready()
    agents = [unique("edge") for _ in range(40)]
    async with BudgetClient.connect(amqp_url, timeout=30, name=connection_name()) as client:
        for agent in agents:
            await client.register_agent(agent)
            await client.allocate(agent, 10_000)
            await client.set_period(agent, Period.MINUTE)
        before = {
            agent: [await client.consume(agent, 1 + i % 3) for i in range(5)] for agent in agents
        }
        await eventually(
            lambda: applied(database_url, sum(map(len, before.values()))),
            within=60,
            what="the consumes before the boundary applied",
        )
        assert workers_clock() < boundary, "the machine was too slow to reach the boundary first"
        await eventually(lambda: workers_clock() >= boundary, within=30, what="the boundary passed")
        after: dict[str, list[str]] = {agent: [] for agent in agents}
        for round_ in range(25):
            for agent in agents:
                after[agent].append(await client.consume(agent, 1))
            if round_ == 3:
                first.kill()  # in the middle of the first batches after the boundary
                worker_process(**start)
        total = sum(map(len, before.values())) + sum(map(len, after.values()))
        await eventually(
            lambda: applied(database_url, total), within=120, what="every consume applied once"
        )
    async with reader(database_url) as engine:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(ledger.c.agent_id, ledger.c.kind, ledger.c.amount, ledger.c.message_id)
                    .where(ledger.c.agent_id.in_(agents))
                    .order_by(ledger.c.agent_id, ledger.c.seq)
                )
            ).all()
            used = dict(
                (await conn.execute(select(budgets.c.agent_id, budgets.c.used_tokens))).all()
            )
        assert await reconcile(engine) == []
    # The model: per agent, its consumes before the boundary, one reset of
    # their sum, then its consumes after, each exactly once and in order.
    for agent in agents:
        mine = [(kind, amount, mid) for a, kind, amount, mid in rows if a == agent]
        spent = sum(1 + i % 3 for i in range(5))
        expected = (
            [("allocate", 10_000)]
            + [("consume", 1 + i % 3) for i in range(5)]
            + [("reset", spent)]
            + [("consume", 1)] * len(after[agent])
        )
        assert [(k, a) for k, a, _ in mine] == expected, agent
        consumed = [mid for kind, _, mid in mine if kind == "consume"]
        assert consumed == before[agent] + after[agent], agent
        assert used[agent] == len(after[agent])


async def applied(database_url: str, count: int) -> bool:
    async with reader(database_url) as engine, engine.connect() as conn:
        rows = await conn.execute(select(ledger.c.kind).where(ledger.c.kind == "consume"))
        return len(rows.all()) >= count
