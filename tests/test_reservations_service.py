"""Holds through BudgetService on SQLite and PostgreSQL: stored, deduplicated,
expired in order, guarded by the database, and reconciled from the ledger."""

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from token_budget.schemas import ErrorCode, ErrorReply, OkReply, parse_command
from token_budget.worker.domain.outcomes import Envelope, Outcome, OutcomeKind
from token_budget.worker.store.audit import history, reconcile
from token_budget.worker.store.committer import GroupCommitter
from token_budget.worker.store.db import create_engine
from token_budget.worker.store.migrate import upgrade
from token_budget.worker.store.service import BudgetService
from token_budget.worker.store.tables import budgets, reservations

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    """A clock the test moves by hand: expiry happens when the test says so."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def env(fields: dict[str, Any], message_id: str | None = "") -> Envelope:
    """An envelope; state-changing commands get a fresh message id unless given one."""
    command = parse_command(json.dumps(fields))
    if message_id == "":
        message_id = f"m-{uuid.uuid4().hex}" if command.changes_state else None
    return Envelope(command, message_id)


def ok(outcome: Outcome) -> OkReply:
    assert isinstance(outcome.reply, OkReply), outcome.reply
    return outcome.reply


def code(outcome: Outcome) -> ErrorCode:
    assert isinstance(outcome.reply, ErrorReply), outcome.reply
    return outcome.reply.error.code


async def stored(engine: AsyncEngine, agent: str) -> tuple[int, int, int]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(
                    budgets.c.allocated_tokens, budgets.c.used_tokens, budgets.c.reserved_tokens
                ).where(budgets.c.agent_id == agent)
            )
        ).one()
    return row[0], row[1], row[2]


async def funded(service: BudgetService, agent: str, tokens: int) -> None:
    await service.apply(
        [
            env({"type": "register_agent", "agent_id": agent}),
            env({"type": "allocate", "agent_id": agent, "tokens": tokens}),
        ]
    )


async def one(
    service: BudgetService, fields: dict[str, Any], message_id: str | None = ""
) -> Outcome:
    (outcome,) = await service.apply([env(fields, message_id)])
    return outcome


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(engine: AsyncEngine, clock: Clock) -> BudgetService:
    return BudgetService(engine, clock=clock, reservation_ttl=60)


def reserve(agent: str, tokens: int, ttl: int | None = None) -> dict[str, Any]:
    fields: dict[str, Any] = {"type": "reserve", "agent_id": agent, "tokens": tokens}
    if ttl is not None:
        fields["ttl_seconds"] = ttl
    return fields


def commit(agent: str, reservation_id: str, tokens: int) -> dict[str, Any]:
    return {"type": "commit", "agent_id": agent, "reservation_id": reservation_id, "tokens": tokens}


def release(agent: str, reservation_id: str) -> dict[str, Any]:
    return {"type": "release", "agent_id": agent, "reservation_id": reservation_id}


# --- holds, stored ---------------------------------------------------------------------


async def test_a_hold_is_stored_with_its_deadline_and_counted_as_reserved(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await funded(service, "a", 100)
    reply = ok(await one(service, reserve("a", 70)))
    assert (reply.reserved_tokens, reply.available_tokens) == (70, 30)
    assert reply.expires_at == T0 + timedelta(seconds=60)  # the service's default TTL
    async with engine.connect() as conn:
        row = (await conn.execute(select(reservations))).one()._mapping
    assert (row["reservation_id"], row["agent_id"], row["tokens"], row["status"]) == (
        reply.reservation_id,
        "a",
        70,
        "open",
    )
    assert await stored(engine, "a") == (100, 0, 70)


async def test_a_duplicate_reserve_returns_the_same_reservation_and_holds_once(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await funded(service, "a", 100)
    first, same_batch = await service.apply(
        [env(reserve("a", 30), "res-1"), env(reserve("a", 30), "res-1")]
    )
    later = await one(service, reserve("a", 30), "res-1")
    assert [o.kind for o in (first, same_batch, later)] == [
        OutcomeKind.APPLIED,
        OutcomeKind.DUPLICATE,
        OutcomeKind.DUPLICATE,
    ]
    assert ok(first).reservation_id == ok(same_batch).reservation_id == ok(later).reservation_id
    assert first.body == later.body
    assert await stored(engine, "a") == (100, 0, 30)


async def test_commit_turns_the_hold_into_usage_and_frees_the_rest(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await funded(service, "a", 100)
    rid = ok(await one(service, reserve("a", 60))).reservation_id
    assert rid is not None
    reply = ok(await one(service, commit("a", rid, 25)))
    assert (reply.used_tokens, reply.reserved_tokens, reply.available_tokens) == (25, 0, 75)
    assert reply.reservation_id is None
    assert await stored(engine, "a") == (100, 25, 0)
    assert [(e.kind, e.amount, e.reservation_id) for e in await history(engine, "a")][1:] == [
        ("reserve", 60, rid),
        ("settle", 60, rid),
        ("commit", 25, rid),
    ]


async def test_release_frees_the_hold_without_usage(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await funded(service, "a", 100)
    rid = ok(await one(service, reserve("a", 60))).reservation_id
    assert rid is not None
    assert ok(await one(service, release("a", rid))).available_tokens == 100
    assert await stored(engine, "a") == (100, 0, 0)


async def test_unknown_and_finished_reservations_are_refused_without_change(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await funded(service, "a", 100)
    await funded(service, "b", 100)
    rid = ok(await one(service, reserve("a", 10))).reservation_id
    assert rid is not None
    await one(service, commit("a", rid, 5))
    outcomes = await service.apply(
        [
            env(commit("a", "no-such-hold", 1)),
            env(release("a", "no-such-hold")),
            env(commit("a", rid, 5)),
            env(release("a", rid)),
            env(release("b", rid)),
        ]
    )
    assert [code(o) for o in outcomes] == [
        ErrorCode.RESERVATION_NOT_FOUND,
        ErrorCode.RESERVATION_NOT_FOUND,
        ErrorCode.RESERVATION_CLOSED,
        ErrorCode.RESERVATION_CLOSED,
        ErrorCode.RESERVATION_NOT_FOUND,  # another agent's hold is not b's to know of
    ]
    assert await stored(engine, "a") == (100, 5, 0)
    assert await stored(engine, "b") == (100, 0, 0)
    assert len(await history(engine, "a")) == 4


async def test_a_reserve_beyond_what_is_available_is_refused(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await funded(service, "a", 100)
    await one(service, {"type": "consume", "agent_id": "a", "tokens": 30})
    await one(service, reserve("a", 50))
    refused = await one(service, reserve("a", 21))
    assert isinstance(refused.reply, ErrorReply)
    error = refused.reply.error
    assert (error.code, error.requested_tokens, error.available_tokens) == (
        ErrorCode.INSUFFICIENT_BUDGET,
        21,
        20,
    )
    assert await stored(engine, "a") == (100, 30, 50)


async def test_the_database_refuses_used_plus_reserved_beyond_allocated(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await funded(service, "a", 100)
    await one(service, reserve("a", 60))
    for statement in (
        "UPDATE budgets SET used_tokens = 41",
        "UPDATE budgets SET reserved_tokens = -1",
    ):
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(text(statement))
    assert await stored(engine, "a") == (100, 0, 60)


# --- expiry ----------------------------------------------------------------------------


async def test_an_overdue_hold_expires_before_the_agents_next_command(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await funded(service, "a", 100)
    rid = ok(await one(service, reserve("a", 100, ttl=10))).reservation_id
    clock.advance(9.999)
    assert code(await one(service, {"type": "consume", "agent_id": "a", "tokens": 1})) is (
        ErrorCode.INSUFFICIENT_BUDGET
    )
    clock.advance(0.001)  # the deadline itself
    used = ok(await one(service, {"type": "consume", "agent_id": "a", "tokens": 100}, "c-1"))
    assert (used.used_tokens, used.reserved_tokens) == (100, 0)
    assert [(e.kind, e.message_id) for e in await history(engine, "a")][2:] == [
        ("expire", f"expire:{rid}"),
        ("consume", "c-1"),
    ]
    assert await reconcile(engine) == []


async def test_a_commit_after_the_deadline_finds_the_hold_expired(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await funded(service, "a", 100)
    rid = ok(await one(service, reserve("a", 40, ttl=5))).reservation_id
    assert rid is not None
    clock.advance(5)
    late = await one(service, commit("a", rid, 40))
    assert code(late) is ErrorCode.RESERVATION_CLOSED
    assert isinstance(late.reply, ErrorReply) and "expired" in late.reply.error.message
    assert await stored(engine, "a") == (100, 0, 0)


async def test_expiry_takes_its_place_in_the_agents_order_within_a_batch(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await funded(service, "a", 100)
    await funded(service, "b", 100)
    await one(service, reserve("a", 80, ttl=10))
    clock.advance(10)
    # b's commands come first; a's hold expires just before a's first command.
    outcomes = await service.apply(
        [
            env({"type": "consume", "agent_id": "b", "tokens": 1}),
            env({"type": "get_budget", "agent_id": "a"}),
            env(reserve("a", 100, ttl=10)),
        ]
    )
    assert ok(outcomes[1]).reserved_tokens == 0
    assert ok(outcomes[2]).reserved_tokens == 100
    kinds = [e.kind for e in await history(engine, "a")]
    assert kinds == ["allocate", "reserve", "expire", "reserve"]


async def test_a_query_after_the_deadline_records_the_expiry(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await funded(service, "a", 100)
    await one(service, reserve("a", 30, ttl=1))
    clock.advance(2)
    assert await service.overdue_agents() == ["a"]
    assert (
        ok(
            await one(service, {"type": "expire_reservations", "agent_id": "a"}, None)
        ).available_tokens
        == 100
    )
    assert await service.overdue_agents() == []
    assert await stored(engine, "a") == (100, 0, 0)
    again = await one(service, {"type": "expire_reservations", "agent_id": "a"}, None)
    assert again.kind is OutcomeKind.QUERY
    assert [e.kind for e in await history(engine, "a")] == ["allocate", "reserve", "expire"]
    assert await reconcile(engine) == []


async def test_overdue_agents_lists_each_agent_once_most_overdue_first(
    service: BudgetService, clock: Clock
) -> None:
    for agent, ttl in (("late", 30), ("early", 10), ("fresh", 600)):
        await funded(service, agent, 100)
        await one(service, reserve(agent, 10, ttl=ttl))
        await one(service, reserve(agent, 10, ttl=ttl + 1))
    clock.advance(100)
    assert await service.overdue_agents() == ["early", "late"]


# --- reconciliation --------------------------------------------------------------------


async def test_reconcile_recomputes_reserved_tokens_from_the_ledger(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await funded(service, "a", 100)
    await one(service, reserve("a", 30))
    assert await reconcile(engine) == []
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE budgets SET reserved_tokens = 20"))
    checks = {d.check for d in await reconcile(engine)}
    assert {
        "reserved_tokens = sum of ledger",
        "reserved_tokens = sum of open holds",
        "balance = last ledger row",
    } <= checks


async def test_reconcile_reports_a_hold_closed_behind_the_ledger(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await funded(service, "a", 100)
    await one(service, reserve("a", 30))
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE reservations SET status = 'released', closed_at = created_at")
        )
    assert [d.check for d in await reconcile(engine)] == ["reserved_tokens = sum of open holds"]


async def test_reconcile_reports_an_expiry_row_for_a_hold_that_did_not_expire(
    engine: AsyncEngine, service: BudgetService, clock: Clock
) -> None:
    await funded(service, "a", 100)
    await one(service, reserve("a", 30, ttl=1))
    clock.advance(1)
    await one(service, {"type": "get_budget", "agent_id": "a"}, None)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE reservations SET status = 'released'"))
    assert [d.check for d in await reconcile(engine)] == ["ledger row 3 expires an expired hold"]


# --- concurrency, against an independent model --------------------------------------------

#: Per agent, a script: ("reserve", n) | ("commit", k, n) | ("release", k) | ("consume", n),
#: where k picks one of the agent's earlier reserves (refused ones included).
operations = st.one_of(
    st.tuples(st.just("reserve"), st.integers(1, 40)),
    st.tuples(st.just("commit"), st.integers(0, 9), st.integers(0, 50)),
    st.tuples(st.just("release"), st.integers(0, 9)),
    st.tuples(st.just("consume"), st.integers(1, 30)),
)
scripts = st.lists(st.lists(operations, min_size=1, max_size=12), min_size=2, max_size=5)


class AgentModel:
    """What one agent's budget must go through, whatever other agents do meanwhile."""

    def __init__(self, allocated: int) -> None:
        self.allocated, self.used, self.holds = allocated, 0, {}  # step -> tokens
        self.closed: set[int] = set()

    def step(self, index: int, op: tuple[Any, ...]) -> ErrorCode | None:
        available = self.allocated - self.used - sum(self.holds.values())
        if op[0] in ("reserve", "consume"):
            if op[1] > available:
                return ErrorCode.INSUFFICIENT_BUDGET
            if op[0] == "reserve":
                self.holds[index] = op[1]
            else:
                self.used += op[1]
            return None
        target = op[1]
        if target in self.closed:
            return ErrorCode.RESERVATION_CLOSED
        if target not in self.holds:
            return ErrorCode.RESERVATION_NOT_FOUND
        if op[0] == "commit" and op[2] > available + self.holds[target]:
            return ErrorCode.INSUFFICIENT_BUDGET
        del self.holds[target]
        self.closed.add(target)
        if op[0] == "commit":
            self.used += op[2]
        return None


async def run_agent(applier: Any, agent: str, script: list[tuple[Any, ...]]) -> AgentModel:
    model = AgentModel(100)
    reserve_ids: list[tuple[int, str]] = []  # (step, reservation id or a made-up one)
    for index, op in enumerate(script):
        if op[0] in ("reserve", "consume"):
            fields: dict[str, Any] = {"type": op[0], "agent_id": agent, "tokens": op[1]}
        else:
            target, rid = reserve_ids[op[1] % len(reserve_ids)] if reserve_ids else (-1, "none")
            op = (op[0], target, *op[2:])
            fields = commit(agent, rid, op[2]) if op[0] == "commit" else release(agent, rid)
        (outcome,) = await applier.apply([env(fields)])
        expected = model.step(index, op)
        if expected is None:
            reply = ok(outcome)
            assert reply.used_tokens is not None and reply.reserved_tokens is not None
            assert (reply.used_tokens, reply.reserved_tokens) == (
                model.used,
                sum(model.holds.values()),
            )
        else:
            assert code(outcome) is expected, (agent, index, op)
        if op[0] == "reserve":
            rid = ok(outcome).reservation_id if expected is None else f"refused-{index}"
            assert rid is not None
            reserve_ids.append((index, rid))
    return model


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(drawn=scripts)
async def test_concurrent_agents_never_hold_or_use_more_than_allocated(
    engine: AsyncEngine, database_url: str, drawn: list[list[tuple[Any, ...]]]
) -> None:
    second = create_engine(database_url)
    shared = GroupCommitter(BudgetService(engine))
    try:
        appliers = [shared, BudgetService(second)]
        tag = uuid.uuid4().hex[:8]
        agents = [f"{tag}-{n}" for n in range(len(drawn))]
        for agent in agents:
            await funded(BudgetService(engine), agent, 100)
        models = await asyncio.gather(
            *(
                run_agent(appliers[n % 2], agent, script)
                for n, (agent, script) in enumerate(zip(agents, drawn, strict=True))
            )
        )
    finally:
        await shared.close()
        await second.dispose()
    for agent, model in zip(agents, models, strict=True):
        assert await stored(engine, agent) == (100, model.used, sum(model.holds.values()))
    assert [d for d in await reconcile(engine) if d.agent_id.startswith(tag)] == []


# --- schema -------------------------------------------------------------------------------


async def test_upgrading_a_0002_database_keeps_its_budgets_under_the_new_guards(
    database_url: str,
) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade(engine, "0002")
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO agents VALUES ('old', CURRENT_TIMESTAMP)"))
            await conn.execute(
                text("INSERT INTO budgets VALUES ('old', 10, 4, 0, CURRENT_TIMESTAMP)")
            )
        await upgrade(engine)
        assert await stored(engine, "old") == (10, 4, 0)
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE budgets SET reserved_tokens = 7"))
        reply = ok(await one(BudgetService(engine), reserve("old", 6)))
        assert (reply.reserved_tokens, reply.available_tokens) == (6, 0)
    finally:
        await engine.dispose()


# --- the hot path stays batch-shaped ------------------------------------------------------


async def statements_for(engine: AsyncEngine, service: BudgetService, agents: int) -> int:
    """SQL statements one batch of holds for ``agents`` agents costs (executemany = 1)."""
    tag = uuid.uuid4().hex[:6]
    names = [f"{tag}-{n}" for n in range(agents)]
    for name in names:
        await funded(service, name, 100)
    held = await service.apply([env(reserve(name, 10)) for name in names])
    rids = [ok(outcome).reservation_id or "" for outcome in held]
    batch = [env(reserve(name, 20)) for name in names]
    batch += [env(commit(name, rid, 5)) for name, rid in zip(names, rids, strict=True)]
    batch += [env({"type": "consume", "agent_id": name, "tokens": 50}) for name in names]
    seen: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        await service.apply(batch)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)
    return len(seen)


async def test_a_batch_costs_the_same_statements_for_3_agents_as_for_60(
    engine: AsyncEngine, service: BudgetService
) -> None:
    assert await statements_for(engine, service, 3) == await statements_for(engine, service, 60)
