"""Threshold crossings recorded in the outbox with their change, on both databases."""

import json
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from token_budget.schemas import ThresholdCrossedEvent, parse_command
from token_budget.worker.domain.outcomes import Envelope, Fence, OutcomeKind
from token_budget.worker.store.service import BudgetService
from token_budget.worker.store.tables import outbox, partition_leases


def env(fields: dict[str, Any], message_id: str | None = None) -> Envelope:
    return Envelope(parse_command(json.dumps(fields)), message_id or f"m-{uuid.uuid4().hex}")


def consume(agent: str, tokens: int) -> dict[str, Any]:
    return {"type": "consume", "agent_id": agent, "tokens": tokens}


def allocate(agent: str, tokens: int) -> dict[str, Any]:
    return {"type": "allocate", "agent_id": agent, "tokens": tokens}


async def events(engine: AsyncEngine) -> list[tuple[str, ThresholdCrossedEvent]]:
    """(routing key, event) of every outbox row, in the order recorded."""
    async with engine.connect() as conn:
        rows = await conn.execute(select(outbox.c.routing_key, outbox.c.body).order_by(outbox.c.id))
        return [(key, ThresholdCrossedEvent.model_validate_json(body)) for key, body in rows]


@pytest.fixture
async def service(engine: AsyncEngine) -> BudgetService:
    service = BudgetService(engine)
    await service.apply([env({"type": "register_agent", "agent_id": "a"}), env(allocate("a", 200))])
    return service


async def test_usage_crossing_a_threshold_records_one_event_with_the_change(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply([env(consume("a", 99), "below")])
    assert await events(engine) == []
    await service.apply([env(consume("a", 1), "at-50")])
    [(key, event)] = await events(engine)
    assert key == "budget.threshold.50"
    assert (event.agent_id, event.threshold, event.allocated_tokens, event.used_tokens) == (
        "a",
        50,
        200,
        100,
    )
    assert (event.command_type, event.message_id, event.ledger_seq) == ("consume", "at-50", 3)


async def test_one_change_crossing_several_thresholds_records_one_event_each(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply([env(consume("a", 200))])
    found = await events(engine)
    assert [key for key, _ in found] == [f"budget.threshold.{p}" for p in (50, 80, 100)]
    assert len({event.event_id for _, event in found}) == 3


async def test_a_redelivered_crossing_records_no_second_event(
    engine: AsyncEngine, service: BudgetService
) -> None:
    crossing = env(consume("a", 120), "cross")
    await service.apply([crossing, crossing])
    again = await service.apply([crossing])
    assert again[0].kind is OutcomeKind.DUPLICATE
    assert [e.threshold for _, e in await events(engine)] == [50]


async def test_holds_cross_no_threshold_and_their_commit_does(
    engine: AsyncEngine, service: BudgetService
) -> None:
    (held,) = await service.apply([env({"type": "reserve", "agent_id": "a", "tokens": 200})])
    assert await events(engine) == []
    rid = held.reply.reservation_id  # type: ignore[union-attr]
    await service.apply(
        [
            env(
                {"type": "commit", "agent_id": "a", "reservation_id": rid, "tokens": 170},
                "the-commit",
            )
        ]
    )
    assert [
        (e.threshold, e.command_type, e.message_id, e.reserved_tokens)
        for _, e in await events(engine)
    ] == [
        (50, "commit", "the-commit", 0),
        (80, "commit", "the-commit", 0),
    ]


async def test_an_allocation_below_a_fired_threshold_rearms_it(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply([env(consume("a", 110))])
    await service.apply([env(allocate("a", 200))])  # 110 / 400 < 50%
    await service.apply([env(consume("a", 90))])  # 200 / 400
    found = [(e.threshold, e.allocated_tokens, e.used_tokens) for _, e in await events(engine)]
    assert found == [(50, 200, 110), (50, 400, 200)]


async def test_thresholds_set_per_budget_replace_the_defaults(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply([env({"type": "set_thresholds", "agent_id": "a", "thresholds": [90, 25]})])
    await service.apply([env(consume("a", 199))])
    assert [e.threshold for _, e in await events(engine)] == [25, 90]
    await service.apply([env({"type": "set_thresholds", "agent_id": "a", "thresholds": []})])
    await service.apply([env(consume("a", 1))])
    assert len(await events(engine)) == 2


async def test_events_wait_for_the_worker_of_their_partition_until_marked_published(
    engine: AsyncEngine, service: BudgetService
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            partition_leases.insert().values(partition=2, owner="w", epoch=1, expires_at=1e12)
        )
    await service.apply([env({"type": "register_agent", "agent_id": "b"}), env(allocate("b", 10))])
    await service.apply([env(consume("a", 100))])  # outside a pool: no partition
    await service.apply([env(consume("b", 5))], Fence(2, "w", 1))
    agents = lambda found: [json.loads(e.body)["agent_id"] for e in found]  # noqa: E731
    assert agents(await service.pending_events({1})) == ["a"]
    both = await service.pending_events({2})
    assert agents(both) == ["a", "b"]
    assert [e.routing_key for e in both] == ["budget.threshold.50"] * 2
    await service.mark_published([both[0].id])
    assert agents(await service.pending_events(None)) == ["b"]
    async with engine.connect() as conn:
        published = await conn.scalar(
            select(func.count()).select_from(outbox).where(outbox.c.published_at.is_not(None))
        )
    assert published == 1
