"""Budget periods applied by BudgetService with an injected clock, on both databases."""

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.clock import Clock
from token_budget.schemas import ErrorCode, OkReply, ThresholdCrossedEvent, parse_command
from token_budget.worker.domain.outcomes import Envelope, OutcomeKind
from token_budget.worker.store.audit import history, period_usage, reconcile
from token_budget.worker.store.queries import CommittedReader
from token_budget.worker.store.service import BudgetService
from token_budget.worker.store.tables import ledger, outbox

START = datetime(2026, 12, 3, 23, 59, 30, tzinfo=UTC)


def env(fields: dict[str, Any], message_id: str | None = None) -> Envelope:
    return Envelope(parse_command(json.dumps(fields)), message_id or f"m-{uuid.uuid4().hex}")


def consume(tokens: int, agent: str = "a") -> dict[str, Any]:
    return {"type": "consume", "agent_id": agent, "tokens": tokens}


def period(value: str | None, timezone: str = "UTC", agent: str = "a") -> dict[str, Any]:
    return {"type": "set_period", "agent_id": agent, "period": value, "timezone": timezone}


def budget(agent: str = "a") -> dict[str, Any]:
    return {"type": "get_budget", "agent_id": agent}


def ok(outcome: Any) -> OkReply:
    assert isinstance(outcome.reply, OkReply), outcome.reply
    return outcome.reply


async def kinds(engine: AsyncEngine, agent: str = "a") -> list[tuple[str, int]]:
    return [(e.kind, e.amount) for e in await history(engine, agent)]


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
async def service(engine: AsyncEngine, clock: Clock) -> BudgetService:
    service = BudgetService(engine, clock=clock)
    await service.apply(
        [
            env({"type": "register_agent", "agent_id": "a"}),
            env({"type": "allocate", "agent_id": "a", "tokens": 100}),
        ]
    )
    return service


async def test_setting_a_period_keeps_the_usage_and_names_the_next_boundary(
    service: BudgetService,
) -> None:
    await service.apply([env(consume(70))])
    [outcome] = await service.apply([env(period("day", "Europe/Berlin"))])
    reply = ok(outcome)
    assert (reply.used_tokens, reply.available_tokens) == (70, 30)
    assert reply.period == "day" and reply.timezone == "Europe/Berlin"
    # 23:59:30 UTC is 00:59:30 on the 4th in Berlin: that day began at 23:00 UTC.
    assert reply.period_start is not None and reply.resets_at is not None
    assert reply.period_start.isoformat() == "2026-12-04T00:00:00+01:00"
    assert reply.resets_at.isoformat() == "2026-12-05T00:00:00+01:00"


async def test_usage_goes_back_to_zero_at_the_boundary_and_the_allocation_stays(
    service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("minute")), env(consume(100))])
    [refused] = await service.apply([env(consume(1))])
    assert refused.kind is OutcomeKind.REFUSED
    clock.advance(seconds=30)  # exactly the boundary: it belongs to the new period
    [applied] = await service.apply([env(consume(100))])
    reply = ok(applied)
    assert (reply.allocated_tokens, reply.used_tokens, reply.available_tokens) == (100, 100, 0)


async def test_a_reset_is_a_ledger_row_naming_the_period_it_closes(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("minute")), env(consume(40))])
    clock.advance(seconds=45)
    await service.apply([env(consume(5))])
    entries = await history(engine, "a")
    reset = entries[-2]
    assert (reset.kind, reset.amount, reset.used_after) == ("reset", 40, 0)
    assert reset.message_id == "reset:2026-12-04T00:00:00Z"
    assert reset.period_start == datetime(2026, 12, 3, 23, 59, tzinfo=UTC)
    assert await reconcile(engine) == []


async def test_the_clock_before_the_boundary_resets_nothing(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("minute")), env(consume(10))])
    clock.advance(seconds=29, microseconds=999_999)
    await service.apply([env(consume(10))])
    assert await kinds(engine) == [("allocate", 100), ("consume", 10), ("consume", 10)]


async def test_a_batch_redelivered_after_the_boundary_resets_once(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("minute")), env(consume(60))])
    clock.advance(minutes=1)
    batch = [env(consume(10)), env(budget())]
    await service.apply(batch)
    again = await service.apply(batch)
    assert again[0].kind is OutcomeKind.DUPLICATE
    resets = [k for k in await kinds(engine) if k[0] == "reset"]
    assert resets == [("reset", 60)]
    assert ok(again[1]).used_tokens == 10


async def test_a_retry_from_the_previous_period_is_answered_from_its_record(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("minute"))])
    late = env(consume(30), "sent-before-the-boundary")
    [first] = await service.apply([late])
    clock.advance(minutes=1)
    [retry] = await service.apply([late])
    assert retry.kind is OutcomeKind.DUPLICATE
    assert retry.body == first.body
    [now] = await service.apply([env(budget())])
    assert ok(now).used_tokens == 0


async def test_an_idle_agent_is_reset_once_for_many_boundaries(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("hour")), env(consume(25))])
    clock.advance(hours=5, minutes=10)
    [outcome] = await service.apply([env(budget())])
    reply = ok(outcome)
    assert reply.used_tokens == 0
    assert reply.period_start is not None
    assert reply.period_start.isoformat() == "2026-12-04T05:00:00+00:00"
    assert [k for k in await kinds(engine) if k[0] == "reset"] == [("reset", 25)]


async def test_a_period_that_ends_unused_moves_on_without_a_ledger_row(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("minute"))])
    clock.advance(minutes=3)
    [outcome] = await service.apply([env(budget())])
    assert ok(outcome).resets_at is not None
    assert await kinds(engine) == [("allocate", 100)]


async def test_open_holds_stay_reserved_across_the_boundary_and_commit_in_the_new_period(
    service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("minute")), env(consume(50))])
    [held] = await service.apply([env({"type": "reserve", "agent_id": "a", "tokens": 30})])
    reservation = ok(held).reservation_id
    clock.advance(minutes=1)
    [after] = await service.apply([env(budget())])
    assert (ok(after).used_tokens, ok(after).reserved_tokens) == (0, 30)
    commit = {"type": "commit", "agent_id": "a", "reservation_id": reservation, "tokens": 20}
    [committed] = await service.apply([env(commit)])
    assert (ok(committed).used_tokens, ok(committed).reserved_tokens) == (20, 0)


async def test_thresholds_fire_again_in_each_period(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("minute")), env(consume(50))])
    clock.advance(minutes=1)
    await service.apply([env(consume(50))])
    async with engine.connect() as conn:
        bodies = (await conn.execute(select(outbox.c.body).order_by(outbox.c.id))).scalars()
        fired = [ThresholdCrossedEvent.model_validate_json(b).threshold for b in bodies]
    assert fired == [50, 50]


async def test_removing_the_period_keeps_the_usage_and_stops_resets(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("minute")), env(consume(40))])
    [removed] = await service.apply([env(period(None))])
    assert ok(removed).period is None and ok(removed).used_tokens == 40
    assert b'"period"' not in removed.body
    clock.advance(hours=2)
    [later] = await service.apply([env(budget())])
    assert ok(later).used_tokens == 40


async def test_set_period_for_an_unregistered_agent_is_agent_not_found(
    service: BudgetService,
) -> None:
    [outcome] = await service.apply([env(period("day", agent="nobody"))])
    assert outcome.kind is OutcomeKind.REFUSED
    assert json.loads(outcome.body)["error"]["code"] == ErrorCode.AGENT_NOT_FOUND


async def test_a_second_reset_of_one_boundary_is_refused_by_the_database(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("minute")), env(consume(40))])
    clock.advance(minutes=1)
    await service.apply([env(consume(1))])
    [reset] = [e for e in await history(engine, "a") if e.kind == "reset"]
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(
                insert(ledger).values(
                    agent_id="a",
                    seq=99,
                    message_id=reset.message_id,
                    kind="reset",
                    amount=1,
                    allocated_after=100,
                    used_after=0,
                    created_at=clock(),
                )
            )


async def test_history_sums_each_period(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(consume(5)), env(period("minute")), env(consume(7))])
    clock.advance(minutes=1)
    await service.apply([env(consume(3))])
    clock.advance(minutes=2)
    await service.apply([env(consume(4)), env(consume(6))])
    used = [(u.start, u.used, u.closed) for u in period_usage(await history(engine, "a"), None)]
    minute = datetime(2026, 12, 3, 23, 59, tzinfo=UTC)
    assert used[:2] == [(minute, 12, True), (datetime(2026, 12, 4, tzinfo=UTC), 3, True)]
    assert used[2][1:] == (10, False)


async def test_a_committed_query_shows_an_ended_period_as_reset(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("minute")), env(consume(80))])
    clock.advance(minutes=1)
    committed = {**budget(), "consistency": "committed"}
    [outcome] = await CommittedReader(engine, clock=clock).apply([env(committed)])
    assert ok(outcome).used_tokens == 0
    assert [k for k in await kinds(engine) if k[0] == "reset"] == []  # it only reads


async def test_reconcile_names_a_reset_that_does_not_set_back_the_whole_usage(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await service.apply([env(period("minute")), env(consume(40))])
    clock.advance(minutes=1)
    await service.apply([env(budget())])
    async with engine.begin() as conn:
        await conn.execute(update(ledger).where(ledger.c.kind == "reset").values(amount=30))
    found = [d.check for d in await reconcile(engine)]
    assert "ledger row 3 resets the usage before it" in found
