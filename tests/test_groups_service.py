"""Group budgets applied by BudgetService, on both databases."""

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.clock import Clock
from token_budget.schemas import ErrorCode, OkReply, ThresholdCrossedEvent, parse_command
from token_budget.worker.domain.outcomes import Envelope, Outcome, OutcomeKind
from token_budget.worker.store.audit import reconcile
from token_budget.worker.store.queries import CommittedReader
from token_budget.worker.store.service import BudgetService
from token_budget.worker.store.tables import groups, outbox


def env(fields: dict[str, Any], message_id: str | None = None) -> Envelope:
    return Envelope(parse_command(json.dumps(fields)), message_id or f"m-{uuid.uuid4().hex}")


def group(group_id: str, parent: str | None = None) -> dict[str, Any]:
    return {"type": "register_group", "group_id": group_id, "parent_id": parent}


def agent(agent_id: str, group_id: str | None = None) -> dict[str, Any]:
    return {"type": "register_agent", "agent_id": agent_id, "group_id": group_id}


def allocate(tokens: int, **target: str) -> dict[str, Any]:
    return {"type": "allocate", "tokens": tokens, **target}


def consume(agent_id: str, tokens: int) -> dict[str, Any]:
    return {"type": "consume", "agent_id": agent_id, "tokens": tokens}


def budget(**target: str) -> dict[str, Any]:
    return {"type": "get_budget", **target}


def error(outcome: Outcome) -> dict[str, Any]:
    assert outcome.kind in (OutcomeKind.REFUSED, OutcomeKind.QUERY_REFUSED), outcome
    body: dict[str, Any] = json.loads(outcome.body)["error"]
    return body


def ok(outcome: Outcome) -> OkReply:
    assert isinstance(outcome.reply, OkReply), outcome.reply
    return outcome.reply


async def one(service: BudgetService, fields: dict[str, Any]) -> Outcome:
    [outcome] = await service.apply([env(fields)])
    return outcome


@pytest.fixture
async def tree(engine: AsyncEngine) -> BudgetService:
    """org (600) → team (1,000) → ten agents of 200 each."""
    service = BudgetService(engine)
    await service.apply([env(group("org")), env(group("team", "org"))])
    await service.apply([env(allocate(600, group_id="org")), env(allocate(1000, group_id="team"))])
    for i in range(10):
        await service.apply([env(agent(f"a{i}", "team")), env(allocate(200, agent_id=f"a{i}"))])
    return service


async def test_concurrent_consumes_stop_exactly_at_the_org_and_name_it(
    tree: BudgetService, engine: AsyncEngine
) -> None:
    # 200 consumes of 10, twenty per agent, as ten lanes' batches at once.
    batches = [[env(consume(f"a{i}", 10)) for _ in range(20)] for i in range(10)]
    results = await asyncio.gather(*(tree.apply(batch) for batch in batches))
    outcomes = [o for result in results for o in result]
    applied = [o for o in outcomes if o.kind is OutcomeKind.APPLIED]
    refused = [error(o) for o in outcomes if o.kind is OutcomeKind.REFUSED]
    assert (len(applied), len(refused)) == (60, 140)
    assert {(e["code"], e["limited_by"]) for e in refused} == {("insufficient_budget", "org")}
    assert ok(await one(tree, budget(group_id="org"))).used_tokens == 600
    assert ok(await one(tree, budget(group_id="team"))).used_tokens == 600
    assert await reconcile(engine) == []


async def test_a_top_up_of_the_org_makes_the_team_bind_next(tree: BudgetService) -> None:
    for i in range(6):
        await tree.apply([env(consume(f"a{i}", 100))])
    await tree.apply([env(allocate(1000, group_id="org"))])
    await tree.apply([env(consume(f"a{i}", 100)) for i in range(4)])
    refusal = error(await one(tree, consume("a9", 1)))
    assert (refusal["limited_by"], refusal["available_tokens"]) == ("team", 0)


async def test_the_agent_itself_is_named_when_it_binds_first(tree: BudgetService) -> None:
    refusal = error(await one(tree, consume("a0", 201)))
    assert (refusal["code"], refusal["limited_by"]) == ("insufficient_budget", "a0")


async def test_an_agent_without_a_group_gets_no_limited_by(engine: AsyncEngine) -> None:
    service = BudgetService(engine)
    await service.apply([env(agent("solo")), env(allocate(5, agent_id="solo"))])
    assert "limited_by" not in error(await one(service, consume("solo", 6)))


async def test_a_hold_is_taken_and_given_back_at_every_level(
    tree: BudgetService, engine: AsyncEngine
) -> None:
    held = ok(await one(tree, {"type": "reserve", "agent_id": "a1", "tokens": 150}))
    for level in ("team", "org"):
        assert ok(await one(tree, budget(group_id=level))).reserved_tokens == 150
    release = {"type": "release", "agent_id": "a1", "reservation_id": held.reservation_id}
    await tree.apply([env(release)])
    for level in ("team", "org"):
        view = ok(await one(tree, budget(group_id=level)))
        assert (view.reserved_tokens, view.used_tokens) == (0, 0)
    assert await reconcile(engine) == []


async def test_a_commit_charges_every_level_what_was_used(tree: BudgetService) -> None:
    held = ok(await one(tree, {"type": "reserve", "agent_id": "a1", "tokens": 150}))
    commit = {"type": "commit", "agent_id": "a1", "reservation_id": held.reservation_id}
    await tree.apply([env({**commit, "tokens": 40})])
    view = ok(await one(tree, budget(group_id="org")))
    assert (view.used_tokens, view.reserved_tokens, view.available_tokens) == (40, 0, 560)


async def test_a_group_without_an_allocation_limits_nobody(engine: AsyncEngine) -> None:
    service = BudgetService(engine)
    await service.apply([env(group("free")), env(agent("x", "free"))])
    await service.apply([env(allocate(100, agent_id="x")), env(consume("x", 100))])
    view = ok(await one(service, budget(group_id="free")))
    assert (view.allocated_tokens, view.used_tokens, view.available_tokens) == (None, 100, None)


async def test_a_first_group_allocation_below_its_usage_is_refused(engine: AsyncEngine) -> None:
    service = BudgetService(engine)
    await service.apply([env(group("late")), env(agent("y", "late"))])
    await service.apply([env(allocate(100, agent_id="y")), env(consume("y", 70))])
    refusal = error(await one(service, allocate(50, group_id="late")))
    assert (refusal["code"], refusal["limited_by"]) == ("insufficient_budget", "late")
    assert ok(await one(service, allocate(70, group_id="late"))).available_tokens == 0


@pytest.mark.parametrize(
    ("first", "then", "code"),
    [
        (agent("dup"), group("dup"), ErrorCode.CONFLICT),
        (group("dup"), agent("dup"), ErrorCode.CONFLICT),
        (group("g"), group("g", "nowhere"), ErrorCode.CONFLICT),
        (group("g"), agent("z", "nowhere"), ErrorCode.GROUP_NOT_FOUND),
        (group("g"), group("h", "nowhere"), ErrorCode.GROUP_NOT_FOUND),
        (group("g"), allocate(5, group_id="nowhere"), ErrorCode.GROUP_NOT_FOUND),
        (agent("z", "g"), agent("z", "g"), ErrorCode.GROUP_NOT_FOUND),
    ],
)
async def test_ids_and_groups_are_checked(
    engine: AsyncEngine, first: dict[str, Any], then: dict[str, Any], code: ErrorCode
) -> None:
    service = BudgetService(engine)
    await service.apply([env(first)])
    assert error(await one(service, then))["code"] == code


async def test_registering_an_agent_again_with_another_group_is_a_conflict(
    tree: BudgetService,
) -> None:
    await tree.apply([env(group("other"))])
    assert error(await one(tree, agent("a0", "other")))["code"] == ErrorCode.CONFLICT
    assert ok(await one(tree, agent("a0", "team"))).agent_id == "a0"


async def test_set_group_moves_future_charges_and_refuses_open_holds(
    tree: BudgetService, engine: AsyncEngine
) -> None:
    await tree.apply([env(group("other")), env(consume("a0", 50))])
    held = ok(await one(tree, {"type": "reserve", "agent_id": "a0", "tokens": 5}))
    move = {"type": "set_group", "agent_id": "a0", "group_id": "other"}
    assert error(await one(tree, move))["code"] == ErrorCode.HOLDS_OPEN
    await tree.apply(
        [env({"type": "release", "agent_id": "a0", "reservation_id": held.reservation_id})]
    )
    ok(await one(tree, move))
    await tree.apply([env(consume("a0", 20))])
    assert ok(await one(tree, budget(group_id="team"))).used_tokens == 50
    assert ok(await one(tree, budget(group_id="other"))).used_tokens == 20
    assert await reconcile(engine) == []


async def test_three_levels_above_an_agent_are_all_charged(engine: AsyncEngine) -> None:
    service = BudgetService(engine)
    await service.apply([env(group("o")), env(group("t", "o")), env(group("s", "t"))])
    await service.apply([env(agent("deep", "s")), env(allocate(100, agent_id="deep"))])
    await service.apply([env(consume("deep", 30))])
    for level in ("s", "t", "o"):
        assert ok(await one(service, budget(group_id=level))).used_tokens == 30


async def test_group_thresholds_fire_once_per_crossing(
    tree: BudgetService, engine: AsyncEngine
) -> None:
    crossing = env(consume("a0", 200))
    await tree.apply([env(consume("a1", 100)), crossing])
    await tree.apply([crossing])  # a redelivery
    async with engine.connect() as conn:
        bodies = (await conn.execute(select(outbox.c.body).order_by(outbox.c.id))).scalars()
        events = [ThresholdCrossedEvent.model_validate_json(b) for b in bodies]
    by_group = sorted((e.group_id or "", e.threshold, e.agent_id) for e in events if e.group_id)
    assert by_group == [("org", 50, "a0")]  # org at 300/600; team at 300/1000 crossed nothing


async def test_reconcile_names_a_group_whose_usage_is_not_its_members(
    tree: BudgetService, engine: AsyncEngine
) -> None:
    await tree.apply([env(consume("a0", 10))])
    async with engine.begin() as conn:
        await conn.execute(update(groups).where(groups.c.group_id == "team").values(used_tokens=9))
    found = [(d.agent_id, d.check) for d in await reconcile(engine)]
    assert ("team", "group used_tokens = members' usage - resets") in found


async def test_a_committed_query_reads_a_groups_budget(
    tree: BudgetService, engine: AsyncEngine
) -> None:
    await tree.apply([env(consume("a3", 25))])
    query = {**budget(group_id="org"), "consistency": "committed"}
    [outcome] = await CommittedReader(engine).apply([env(query)])
    view = ok(outcome)
    assert (view.group_id, view.agent_id, view.used_tokens) == ("org", None, 25)
    [missing] = await CommittedReader(engine).apply([env(budget(group_id="nowhere"))])
    assert error(missing)["code"] == ErrorCode.GROUP_NOT_FOUND


async def test_a_query_for_a_missing_group_does_not_make_its_id_a_group(
    engine: AsyncEngine,
) -> None:
    service = BudgetService(engine)
    query, register = env(budget(group_id="x")), env(agent("x"))
    missing, registered = await service.apply([query, register])
    assert error(missing)["code"] == ErrorCode.GROUP_NOT_FOUND
    assert ok(registered).agent_id == "x"


async def test_a_hold_expired_by_set_group_is_booked_in_the_group_it_was_taken_in(
    engine: AsyncEngine,
) -> None:
    # Found by test_groups_model: the expiry's ledger row named the new group.
    clock = Clock(datetime(2027, 6, 1, tzinfo=UTC))
    service = BudgetService(engine, clock=clock)
    await service.apply([env(group("old")), env(group("new")), env(agent("x", "old"))])
    await service.apply([env(allocate(100, agent_id="x"))])
    ok(await one(service, {"type": "reserve", "agent_id": "x", "tokens": 40, "ttl_seconds": 30}))
    clock.advance(seconds=31)
    ok(await one(service, {"type": "set_group", "agent_id": "x", "group_id": "new"}))
    assert ok(await one(service, budget(group_id="old"))).reserved_tokens == 0
    assert ok(await one(service, budget(group_id="new"))).reserved_tokens == 0
    assert await reconcile(engine) == []
