"""BudgetService on SQLite and PostgreSQL: the rules, exactly-once, and the database's guards.

No broker: batches of envelopes go straight to the service, and the tables are
read back to see what stuck.
"""

import asyncio
import json
import random
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.db_helpers import install_poison_trigger
from token_budget.schemas import (
    MAX_BALANCE,
    MAX_TOKENS,
    Allocate,
    Command,
    Consume,
    ErrorBody,
    ErrorCode,
    ErrorReply,
    GetAvailable,
    GetBudget,
    OkReply,
    RegisterAgent,
    parse_command,
)
from token_budget.worker.domain.outcomes import Envelope, Outcome, OutcomeKind
from token_budget.worker.store.db import create_engine
from token_budget.worker.store.migrate import current_revision, head_revision, upgrade
from token_budget.worker.store.service import BudgetService
from token_budget.worker.store.tables import agents, budgets, ledger, processed_commands


def register(agent_id: str) -> RegisterAgent:
    return RegisterAgent(type="register_agent", agent_id=agent_id)


def allocate(agent_id: str, tokens: int) -> Allocate:
    return Allocate(type="allocate", agent_id=agent_id, tokens=tokens)


def consume(agent_id: str, tokens: int) -> Consume:
    return Consume(type="consume", agent_id=agent_id, tokens=tokens)


def get_budget(agent_id: str) -> GetBudget:
    return GetBudget(type="get_budget", agent_id=agent_id)


def get_available(agent_id: str) -> GetAvailable:
    return GetAvailable(type="get_available", agent_id=agent_id)


def env(command: Command, message_id: str | None = None) -> Envelope:
    """An envelope with a fresh message id for state-changing commands."""
    if message_id is None and command.changes_state:
        message_id = f"m-{uuid.uuid4().hex}"
    return Envelope(command, message_id)


async def apply_one(
    service: BudgetService, command: Command, message_id: str | None = None
) -> Outcome:
    (outcome,) = await service.apply([env(command, message_id)])
    return outcome


def view(outcome: Outcome) -> tuple[int | None, int | None, int | None]:
    assert isinstance(outcome.reply, OkReply), outcome.reply
    reply = outcome.reply
    return reply.allocated_tokens, reply.used_tokens, reply.available_tokens


def error_of(outcome: Outcome) -> ErrorBody:
    assert isinstance(outcome.reply, ErrorReply), outcome.reply
    return outcome.reply.error


def tokens(envelope: Envelope) -> int:
    assert isinstance(envelope.command, Consume)
    return envelope.command.tokens


async def balance(engine: AsyncEngine, agent_id: str) -> tuple[int, int, int] | None:
    """(allocated, used, ledger_seq) as stored, or None without a budget row."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(
                    budgets.c.allocated_tokens, budgets.c.used_tokens, budgets.c.ledger_seq
                ).where(budgets.c.agent_id == agent_id)
            )
        ).first()
    return None if row is None else (row[0], row[1], row[2])


async def ledger_rows(engine: AsyncEngine, agent_id: str) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(
                ledger.c.seq,
                ledger.c.kind,
                ledger.c.amount,
                ledger.c.allocated_after,
                ledger.c.used_after,
                ledger.c.message_id,
            )
            .where(ledger.c.agent_id == agent_id)
            .order_by(ledger.c.seq)
        )
        return [tuple(row) for row in result]


async def processed_ids(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        result = await conn.execute(select(processed_commands.c.message_id))
        return sorted(row[0] for row in result)


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return len((await conn.execute(select(table))).all())


@pytest.fixture
def service(engine: AsyncEngine) -> BudgetService:
    return BudgetService(engine)


# --- the rules, stored ------------------------------------------------------------


async def test_register_creates_an_agent_without_a_budget(
    engine: AsyncEngine, service: BudgetService
) -> None:
    outcome = await apply_one(service, register("a"))
    assert outcome.kind is OutcomeKind.APPLIED
    assert view(outcome) == (None, None, None)
    assert json.loads(outcome.body)["allocated_tokens"] is None
    assert await count(engine, agents) == 1
    assert await balance(engine, "a") is None


async def test_registering_again_changes_nothing_and_keeps_the_budget(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply([env(register("a")), env(allocate("a", 10)), env(consume("a", 3))])
    again = await apply_one(service, register("a"))
    assert again.kind is OutcomeKind.APPLIED
    assert view(again) == (10, 3, 7)
    assert await count(engine, agents) == 1
    assert await balance(engine, "a") == (10, 3, 2)
    assert len(await ledger_rows(engine, "a")) == 2


async def test_the_first_allocate_creates_the_budget_and_later_ones_add(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await apply_one(service, register("a"))
    first = await apply_one(service, allocate("a", 100))
    assert view(first) == (100, 0, 100)
    assert await balance(engine, "a") == (100, 0, 1)
    second = await apply_one(service, allocate("a", 50))
    assert view(second) == (150, 0, 150)
    assert await balance(engine, "a") == (150, 0, 2)


async def test_consume_takes_tokens_and_queries_read_them(
    engine: AsyncEngine, service: BudgetService
) -> None:
    outcomes = await service.apply(
        [
            env(register("a")),
            env(allocate("a", 100)),
            env(consume("a", 40)),
            env(get_budget("a")),
            env(get_available("a")),
        ]
    )
    assert view(outcomes[2]) == (100, 40, 60)
    assert [o.kind for o in outcomes[3:]] == [OutcomeKind.QUERY, OutcomeKind.QUERY]
    assert view(outcomes[3]) == view(outcomes[4]) == (100, 40, 60)
    assert await balance(engine, "a") == (100, 40, 2)


async def test_consume_beyond_the_available_tokens_is_refused_whole(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply([env(register("a")), env(allocate("a", 10)), env(consume("a", 4))])
    outcome = await apply_one(service, consume("a", 7))
    assert outcome.kind is OutcomeKind.REFUSED
    error = error_of(outcome)
    assert (error.code, error.requested_tokens, error.available_tokens) == (
        ErrorCode.INSUFFICIENT_BUDGET,
        7,
        6,
    )
    assert await balance(engine, "a") == (10, 4, 2)
    assert len(await ledger_rows(engine, "a")) == 2
    exact = await apply_one(service, consume("a", 6))
    assert view(exact) == (10, 10, 0)


async def test_every_command_on_an_unregistered_agent_is_agent_not_found(
    engine: AsyncEngine, service: BudgetService
) -> None:
    commands: list[Command] = [allocate("ghost", 5), consume("ghost", 1)]
    queries: list[Command] = [get_budget("ghost"), get_available("ghost")]
    outcomes = await service.apply([env(c) for c in commands + queries])
    assert [o.kind for o in outcomes] == [OutcomeKind.REFUSED] * 2 + [OutcomeKind.QUERY_REFUSED] * 2
    assert {error_of(o).code for o in outcomes} == {ErrorCode.AGENT_NOT_FOUND}
    assert await count(engine, agents) == 0
    assert await count(engine, budgets) == 0
    assert await count(engine, ledger) == 0


async def test_a_registered_agent_without_budget_is_budget_not_found(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await apply_one(service, register("a"))
    outcomes = await service.apply(
        [env(consume("a", 1)), env(get_budget("a")), env(get_available("a"))]
    )
    assert [o.kind for o in outcomes] == [
        OutcomeKind.REFUSED,
        OutcomeKind.QUERY_REFUSED,
        OutcomeKind.QUERY_REFUSED,
    ]
    assert {error_of(o).code for o in outcomes} == {ErrorCode.BUDGET_NOT_FOUND}
    assert await balance(engine, "a") is None


async def test_balances_reach_the_largest_64_bit_value_and_no_further(
    engine: AsyncEngine, service: BudgetService
) -> None:
    full = [allocate("a", MAX_TOKENS)] * (MAX_BALANCE // MAX_TOKENS)
    await service.apply([env(register("a")), *(env(c) for c in full)])
    top = await apply_one(service, allocate("a", MAX_BALANCE % MAX_TOKENS))
    assert view(top) == (MAX_BALANCE, 0, MAX_BALANCE)
    over = await apply_one(service, allocate("a", 1))
    assert error_of(over).code is ErrorCode.BALANCE_OVERFLOW
    spent = await apply_one(service, consume("a", MAX_TOKENS))
    assert view(spent) == (MAX_BALANCE, MAX_TOKENS, MAX_BALANCE - MAX_TOKENS)
    assert await balance(engine, "a") == (MAX_BALANCE, MAX_TOKENS, 1025)


# --- exactly once -------------------------------------------------------------------


async def test_a_duplicate_in_the_same_batch_returns_the_first_outcome(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply([env(register("a")), env(allocate("a", 10))])
    first, again = await service.apply([env(consume("a", 3), "m-1"), env(consume("a", 3), "m-1")])
    assert first.kind is OutcomeKind.APPLIED
    assert again.kind is OutcomeKind.DUPLICATE
    assert again.body == first.body
    assert again.reply == first.reply
    assert await balance(engine, "a") == (10, 3, 2)


async def test_a_duplicate_in_a_later_batch_returns_the_first_outcome_unchanged(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply([env(register("a")), env(allocate("a", 10))])
    first = await apply_one(service, consume("a", 3), "m-1")
    await apply_one(service, consume("a", 2))
    again = await apply_one(service, consume("a", 3), "m-1")
    assert again.kind is OutcomeKind.DUPLICATE
    assert again.body == first.body  # the balance as it was then, not as it is now
    assert view(again) == (10, 3, 7)
    assert await balance(engine, "a") == (10, 5, 3)


async def test_a_refused_command_retried_after_a_top_up_stays_refused(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply([env(register("a")), env(allocate("a", 5))])
    first = await apply_one(service, consume("a", 8), "m-big")
    assert error_of(first).code is ErrorCode.INSUFFICIENT_BUDGET
    await apply_one(service, allocate("a", 100))
    again = await apply_one(service, consume("a", 8), "m-big")
    assert again.kind is OutcomeKind.DUPLICATE
    assert again.body == first.body
    assert error_of(again).code is ErrorCode.INSUFFICIENT_BUDGET
    assert await balance(engine, "a") == (105, 0, 2)


async def test_a_register_retried_is_a_duplicate(
    engine: AsyncEngine, service: BudgetService
) -> None:
    first = await apply_one(service, register("a"), "m-reg")
    await apply_one(service, allocate("a", 5))
    again = await apply_one(service, register("a"), "m-reg")
    assert again.kind is OutcomeKind.DUPLICATE
    assert again.body == first.body
    assert await count(engine, agents) == 1


async def test_a_message_id_reused_for_another_command_is_a_conflict(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply([env(register("a")), env(register("b")), env(allocate("a", 10))])
    _, same_batch = await service.apply([env(consume("a", 3), "m-1"), env(consume("a", 4), "m-1")])
    later = await apply_one(service, consume("b", 3), "m-1")
    other_type = await apply_one(service, allocate("a", 3), "m-1")
    for outcome in (same_batch, later, other_type):
        assert outcome.kind is OutcomeKind.CONFLICT
        assert error_of(outcome).code is ErrorCode.CONFLICT
    assert await balance(engine, "a") == (10, 3, 2)
    assert await balance(engine, "b") is None


async def test_the_same_command_with_its_keys_in_another_order_is_no_conflict(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply([env(register("a")), env(allocate("a", 10))])
    ordered = parse_command(b'{"type": "consume", "agent_id": "a", "tokens": 3}')
    shuffled = parse_command(b'{"tokens":3,"agent_id":"a","type":"consume"}')
    first = await apply_one(service, ordered, "m-1")
    again = await apply_one(service, shuffled, "m-1")
    assert again.kind is OutcomeKind.DUPLICATE
    assert again.body == first.body


async def test_the_ledger_has_one_row_per_change_numbered_per_agent(
    engine: AsyncEngine, service: BudgetService
) -> None:
    history: list[tuple[str, Command]] = [
        ("r-a", register("a")),
        ("r-b", register("b")),
        ("a-1", allocate("a", 10)),
        ("b-1", allocate("b", 20)),
        ("a-2", consume("a", 4)),
        ("x-1", consume("a", 99)),
        ("b-2", consume("b", 5)),
        ("a-3", allocate("a", 1)),
    ]
    await service.apply([env(command, mid) for mid, command in history[:5]])
    await service.apply([env(command, mid) for mid, command in history[5:]])
    await service.apply([env(command, mid) for mid, command in history[2:4]])  # duplicates
    assert await ledger_rows(engine, "a") == [
        (1, "allocate", 10, 10, 0, "a-1"),
        (2, "consume", 4, 10, 4, "a-2"),
        (3, "allocate", 1, 11, 4, "a-3"),
    ]
    assert await ledger_rows(engine, "b") == [
        (1, "allocate", 20, 20, 0, "b-1"),
        (2, "consume", 5, 20, 5, "b-2"),
    ]
    assert await balance(engine, "a") == (11, 4, 3)


async def test_processed_commands_has_one_row_per_state_changing_command(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply(
        [
            env(register("a"), "p-1"),
            env(allocate("a", 5), "p-2"),
            env(consume("a", 9), "p-3"),
            env(get_budget("a"), "q-1"),
            env(get_available("a")),
            env(allocate("a", 5), "p-2"),
            env(consume("a", 1), "p-2"),
            env(consume("ghost", 1), "p-4"),
        ]
    )
    await apply_one(service, allocate("a", 5), "p-2")
    assert await processed_ids(engine) == ["p-1", "p-2", "p-3", "p-4"]


async def test_the_database_refuses_used_beyond_allocated(
    engine: AsyncEngine, service: BudgetService
) -> None:
    await service.apply([env(register("a")), env(allocate("a", 10))])
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE budgets SET used_tokens = allocated_tokens + 1 WHERE agent_id = 'a'")
            )
    assert await balance(engine, "a") == (10, 0, 1)


async def test_a_command_the_database_refuses_is_isolated_from_its_batch(
    engine: AsyncEngine, service: BudgetService
) -> None:
    setup: list[Command] = [register(a) for a in ("good", "other", "poison")]
    setup += [allocate(a, 100) for a in ("good", "other", "poison")]
    await service.apply([env(c) for c in setup])
    await install_poison_trigger(engine)
    batch = [
        env(consume("good", 10)),
        env(allocate("other", 5)),
        env(register("new")),
        env(consume("poison", 7), "m-poison"),
        env(consume("good", 20)),
        env(consume("other", 1)),
        env(get_budget("good")),
    ]
    outcomes = await service.apply(batch)
    kinds = [o.kind for o in outcomes]
    assert kinds == [OutcomeKind.APPLIED] * 3 + [OutcomeKind.REJECTED] + [
        OutcomeKind.APPLIED,
        OutcomeKind.APPLIED,
        OutcomeKind.QUERY,
    ]
    assert error_of(outcomes[3]).code is ErrorCode.DATABASE_REJECTED
    assert "poison" in error_of(outcomes[3]).message
    assert view(outcomes[6]) == (100, 30, 70)
    assert await balance(engine, "good") == (100, 30, 3)
    assert await balance(engine, "other") == (105, 1, 3)
    assert await balance(engine, "poison") == (100, 0, 1)
    assert await count(engine, agents) == 4
    assert "m-poison" not in await processed_ids(engine)


# --- several writers ------------------------------------------------------------------


async def test_two_services_on_one_database_never_overdraw(
    engine: AsyncEngine, database_url: str
) -> None:
    second = create_engine(database_url)
    try:
        services = (BudgetService(engine), BudgetService(second))
        await services[0].apply([env(register("a")), env(allocate("a", 500))])
        rng = random.Random(7)
        batches = [[env(consume("a", rng.randint(1, 20))) for _ in range(5)] for _ in range(40)]
        results = await asyncio.gather(
            *(services[i % 2].apply(batch) for i, batch in enumerate(batches))
        )
    finally:
        await second.dispose()
    applied = [
        tokens(e)
        for batch, outcomes in zip(batches, results, strict=True)
        for e, o in zip(batch, outcomes, strict=True)
        if o.kind is OutcomeKind.APPLIED
    ]
    kinds = {o.kind for outcomes in results for o in outcomes}
    assert kinds == {OutcomeKind.APPLIED, OutcomeKind.REFUSED}
    stored = await balance(engine, "a")
    assert stored is not None
    allocated, used, seq = stored
    assert used == sum(applied) <= allocated == 500
    rows = await ledger_rows(engine, "a")
    assert [row[0] for row in rows] == list(range(1, seq + 1))
    assert sum(row[2] for row in rows if row[1] == "consume") == used


async def test_a_batch_delivered_to_two_services_is_applied_once(
    engine: AsyncEngine, database_url: str
) -> None:
    second = create_engine(database_url)
    try:
        services = (BudgetService(engine), BudgetService(second))
        await services[0].apply([env(register("a")), env(allocate("a", 10_000))])
        batches = [[env(consume("a", 1 + (i * 5 + j) % 7)) for j in range(5)] for i in range(20)]
        results = await asyncio.gather(
            *(service.apply(batch) for batch in batches for service in services)
        )
    finally:
        await second.dispose()
    for mine, theirs in zip(results[::2], results[1::2], strict=True):
        for ours, other in zip(mine, theirs, strict=True):
            assert ours.body == other.body
            assert sorted([ours.kind, other.kind]) == [
                OutcomeKind.APPLIED,
                OutcomeKind.DUPLICATE,
            ]
    expected = sum(tokens(e) for batch in batches for e in batch)
    assert await balance(engine, "a") == (10_000, expected, 101)


async def test_concurrent_migrations_from_two_engines_succeed(database_url: str) -> None:
    engines = [create_engine(database_url), create_engine(database_url)]
    try:
        await asyncio.gather(*(upgrade(e) for e in engines))
        for engine in engines:
            assert await current_revision(engine) == head_revision()
        outcome = await apply_one(BudgetService(engines[1]), register("a"))
        assert outcome.kind is OutcomeKind.APPLIED
    finally:
        for engine in engines:
            await engine.dispose()


# --- group commit -----------------------------------------------------------------------

steps = st.lists(
    st.tuples(
        st.sampled_from(["register_agent", "allocate", "consume", "get_budget", "get_available"]),
        st.integers(min_value=0, max_value=2),  # agent
        st.integers(min_value=1, max_value=30),  # tokens
        st.one_of(st.none(), st.integers(min_value=0, max_value=30)),  # reuse a message id
        st.booleans(),  # when reusing: repeat the earlier command exactly
    ),
    min_size=1,
    max_size=18,
)


def script(prefix: str, drawn: list[tuple[Any, ...]]) -> list[Envelope]:
    """The drawn steps as envelopes, with agents and message ids under ``prefix``."""
    envelopes: list[Envelope] = []
    changing: list[Envelope] = []
    for i, (kind, agent, amount, reuse, repeat) in enumerate(drawn):
        fields: dict[str, Any] = {"type": kind, "agent_id": f"{prefix}-{agent}"}
        if kind in ("allocate", "consume"):
            fields["tokens"] = amount
        command = parse_command(json.dumps(fields))
        message_id: str | None = None
        if command.changes_state:
            message_id = f"{prefix}-m{i}"
            if reuse is not None and changing:
                earlier = changing[reuse % len(changing)]
                message_id = earlier.message_id
                command = earlier.command if repeat else command
            changing.append(Envelope(command, message_id))
        envelopes.append(Envelope(command, message_id))
    return envelopes


async def snapshot(engine: AsyncEngine, prefix: str) -> list[Any]:
    seen = []
    for agent in range(3):
        agent_id = f"{prefix}-{agent}"
        rows = [
            (*row[:5], row[5].replace(prefix, "P")) for row in await ledger_rows(engine, agent_id)
        ]
        seen.append((await balance(engine, agent_id), rows))
    return seen


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(drawn=steps, data=st.data())
async def test_group_commit_changes_nothing_observable(
    engine: AsyncEngine, drawn: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    service = BudgetService(engine)
    tag = uuid.uuid4().hex[:8]
    batched, single = f"b{tag}", f"s{tag}"
    cuts = sorted(
        data.draw(st.sets(st.integers(min_value=1, max_value=len(drawn) - 1)))
        if len(drawn) > 1
        else set()
    )
    envelopes = script(batched, drawn)
    in_batches: list[Outcome] = []
    for start, end in zip([0, *cuts], [*cuts, len(drawn)], strict=True):
        in_batches += await service.apply(envelopes[start:end])
    one_by_one = [await apply_one(service, e.command, e.message_id) for e in script(single, drawn)]
    assert [o.kind for o in in_batches] == [o.kind for o in one_by_one]
    assert [o.body.replace(batched.encode(), b"P") for o in in_batches] == [
        o.body.replace(single.encode(), b"P") for o in one_by_one
    ]
    assert await snapshot(engine, batched) == await snapshot(engine, single)
