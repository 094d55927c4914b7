"""Group budgets in a pool of real workers on PostgreSQL, one of them killed.

An org over two teams of twenty agents, each agent with its own allocation.
The first team's agents consume first, so that the team fills (the org has
room); then the second team's, so that the org fills (the team has room).
Every consume is 10 tokens and every allocation a multiple of 10, so each
level's final usage is determined whatever the interleaving across lanes,
processes, and the redeliveries after the kill.
"""

import asyncio
import json
import signal
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.amqp_helpers import connection_name, open_amqp
from tests.db_helpers import processed_ids, reader
from tests.eventually import eventually
from tests.processes import WorkerProcess
from token_budget.client import BudgetClient
from token_budget.schemas import DEAD_LETTER_QUEUE, Allocate, RegisterAgent, RegisterGroup
from token_budget.worker.store.audit import reconcile
from token_budget.worker.store.leases import pool_view
from token_budget.worker.store.tables import agents, budgets, groups, ledger, processed_commands

pytestmark = [pytest.mark.slow, pytest.mark.postgresql_only, pytest.mark.timeout(180)]

PARTITIONS = 4
MEMBER_TTL = 1.5
POOL = {
    "partitions": PARTITIONS,
    "lease_ttl": 1.5,
    "member_ttl": MEMBER_TTL,
    "renew_interval": 0.3,
    "processes": 1,
}

TOKENS = 10
#: Consumes each agent publishes: far more than any level lets through.
PER_AGENT = 100
ORG, T1, T2 = "org", "t1", "t2"
ALLOCATED = {ORG: 5_000, T1: 2_500, T2: 4_500}
#: t1's agents could use 6,000 between them: t1 (2,500) binds while the org has room.
T1_AGENTS = {f"t1-a{i:02d}": 300 for i in range(20)}
#: t2's could use 7,000 (half of them bind on their own at 100): the org's
#: remaining 2,500 binds, well before t2's 4,500.
T2_AGENTS = {f"t2-a{i:02d}": 100 if i % 2 == 0 else 600 for i in range(20)}
TEAMS = {T1: T1_AGENTS, T2: T2_AGENTS}
TEAM_OF = {agent: team for team, of in TEAMS.items() for agent in of}
#: What each level ends with.
EXPECTED_USED = {T1: 2_500, T2: 2_500, ORG: 5_000}
PUBLISHERS = 4  # connections, each with two publishing tasks


async def _processed(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).select_from(processed_commands)
        return int((await conn.execute(query)).scalar_one())


async def _set_up(client: BudgetClient) -> int:
    """The tree, through the SDK's generic request; how many commands it took."""
    await client.request(RegisterGroup(type="register_group", group_id=ORG))
    for team in (T1, T2):
        await client.request(RegisterGroup(type="register_group", group_id=team, parent_id=ORG))
    for group_id, tokens in ALLOCATED.items():
        await client.request(Allocate(type="allocate", group_id=group_id, tokens=tokens))

    async def one(agent_id: str, tokens: int) -> None:
        command = RegisterAgent(
            type="register_agent", agent_id=agent_id, group_id=TEAM_OF[agent_id]
        )
        await client.request(command)
        await client.request(Allocate(type="allocate", agent_id=agent_id, tokens=tokens))

    everyone = {**T1_AGENTS, **T2_AGENTS}
    await asyncio.gather(*(one(a, t) for a, t in everyone.items()))
    return 3 + len(ALLOCATED) + 2 * len(everyone)


def _consumes(phase: str, team_agents: dict[str, int]) -> list[tuple[str, str]]:
    """(agent, message_id), the agents' commands interleaved."""
    return [(a, f"{phase}-{a}-{n:03d}") for n in range(PER_AGENT) for a in team_agents]


async def _publish(clients: list[BudgetClient], items: list[tuple[str, str]]) -> None:
    """Fire-and-forget consumes from two tasks per connection, each awaiting its confirms."""
    tasks = 2 * len(clients)

    async def run(index: int) -> None:
        client = clients[index % len(clients)]
        for agent, message_id in items[index::tasks]:
            await client.consume(agent, TOKENS, message_id=message_id)

    await asyncio.gather(*(run(i) for i in range(tasks)))


async def _refusals(engine: AsyncEngine, prefix: str) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(processed_commands.c.reply).where(
                processed_commands.c.message_id.like(f"{prefix}-%")
            )
        )
        replies = [json.loads(reply) for (reply,) in rows]
    return [r["error"] for r in replies if not r["ok"]]


async def test_a_killed_pool_member_leaves_every_level_exact(
    worker_process: Callable[..., WorkerProcess], amqp_url: str, database_url: str
) -> None:
    first = worker_process(**POOL)
    ids = [(await first.wait_ready())["worker_id"]]  # it migrates the database first
    workers = [first, worker_process(**POOL), worker_process(**POOL)]
    for process in workers[1:]:
        ids.append((await process.wait_ready())["worker_id"])
    phase1, phase2 = _consumes("p1", T1_AGENTS), _consumes("p2", T2_AGENTS)
    clients = [
        await BudgetClient.connect(amqp_url, timeout=20, name=connection_name())
        for _ in range(PUBLISHERS)
    ]
    try:
        async with reader(database_url) as engine:
            view = await eventually(
                lambda: pool_view(engine, MEMBER_TTL),
                within=30,
                what="the partitions spread over the three",
                done=lambda v: sorted(len(v.held_by(w)) for w in ids) == [1, 1, 2],
            )
            # The member with the most lanes: the kill strands as many as it can.
            victim = max(range(3), key=lambda i: len(view.held_by(ids[i])))
            setup = await _set_up(clients[0])
            # Phase 1: t1 fills. A worker is killed mid-way; a new one joins.
            publishing = asyncio.create_task(_publish(clients, phase1))
            await eventually(
                lambda: _processed(engine),
                within=30,
                what="phase 1 under way",
                done=lambda n: n >= setup + len(phase1) // 4,
            )
            at_kill = await _processed(engine) - setup
            workers[victim].kill()
            workers.append(worker_process(**POOL))
            await publishing
            assert at_kill < len(phase1)  # the kill landed under load
            await eventually(
                lambda: _processed(engine),
                within=60,
                what="phase 1 applied",
                done=lambda n: n >= setup + len(phase1),
            )
            # Phase 2: the org fills.
            await _publish(clients, phase2)
            everything = setup + len(phase1) + len(phase2)
            await eventually(
                lambda: _processed(engine),
                within=60,
                what="every command applied or refused",
                done=lambda n: n >= everything,
            )
            assert {m for _, m in phase1 + phase2} <= await processed_ids(engine)
            assert await _processed(engine) == everything  # each recorded once
            await _assert_levels(engine)
            await _assert_who_bound(engine)
            assert await reconcile(engine) == []
        async with open_amqp(amqp_url) as amqp:
            assert set((await amqp.lane_backlog(PARTITIONS)).values()) == {0}
            assert await amqp.ready_count(DEAD_LETTER_QUEUE) == 0
    finally:
        for client in clients:
            await client.close()
    killed = workers.pop(victim)
    assert killed.proc is not None and killed.proc.returncode == -signal.SIGKILL
    again = sum(_duplicates(w) for w in workers)
    print(f"\ngroups pool: SIGKILL after {at_kill} of {len(phase1)}, {again} answered again")


def _duplicates(worker: WorkerProcess) -> int:
    """Commands a survivor found already recorded: committed by the killed
    worker, redelivered because it died before acknowledging them."""
    batches = (e for e in worker.events() if e.get("event") == "batch_applied")
    return sum(int(e.get("outcomes", {}).get("duplicate", 0)) for e in batches)


async def _assert_levels(engine: AsyncEngine) -> None:
    """Each level's usage is the sum of its members' consume rows, exactly the
    model's, and within its allocation."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                select(ledger.c.agent_id, ledger.c.group_id, ledger.c.amount).where(
                    ledger.c.kind == "consume"
                )
            )
        ).all()
        group_rows = {
            g: (allocated, used, reserved)
            for g, allocated, used, reserved in await conn.execute(
                select(
                    groups.c.group_id,
                    groups.c.allocated_tokens,
                    groups.c.used_tokens,
                    groups.c.reserved_tokens,
                )
            )
        }
        agent_rows = {
            a: (allocated, used, reserved)
            for a, allocated, used, reserved in await conn.execute(
                select(
                    budgets.c.agent_id,
                    budgets.c.allocated_tokens,
                    budgets.c.used_tokens,
                    budgets.c.reserved_tokens,
                )
            )
        }
        members = dict((await conn.execute(select(agents.c.agent_id, agents.c.group_id))).all())
    assert members == TEAM_OF
    # Every row names the agent's team: the groups it charged.
    assert {(a, g) for a, g, _ in rows} <= set(TEAM_OF.items())
    by_group: dict[str, int] = {}
    by_agent: dict[str, int] = {}
    for agent, group_id, amount in rows:
        by_group[group_id] = by_group.get(group_id, 0) + amount
        by_agent[agent] = by_agent.get(agent, 0) + amount
    by_group[ORG] = by_group.get(T1, 0) + by_group.get(T2, 0)
    # The same sums from the members up: agent → team → org.
    by_member = {team: sum(by_agent.get(a, 0) for a in of) for team, of in TEAMS.items()}
    by_member[ORG] = sum(by_agent.values())
    assert {g: used for g, (_, used, _) in group_rows.items()} == by_group == by_member
    assert by_group == EXPECTED_USED
    assert group_rows == {g: (ALLOCATED[g], EXPECTED_USED[g], 0) for g in ALLOCATED}
    assert {a: used for a, (_, used, _) in agent_rows.items() if used} == by_agent
    allocations = {**T1_AGENTS, **T2_AGENTS}
    for agent, (allocated, used, reserved) in agent_rows.items():
        assert (allocated, reserved) == (allocations[agent], 0), agent
        assert used <= allocated, agent


async def _assert_who_bound(engine: AsyncEngine) -> None:
    """Phase 1 was stopped by t1 (never the org), phase 2 by the org (never t2)."""
    for prefix, team, agents_of, bound in (("p1", T1, T1_AGENTS, T1), ("p2", T2, T2_AGENTS, ORG)):
        refusals = await _refusals(engine, prefix)
        applied = EXPECTED_USED[team] // TOKENS
        assert len(refusals) == len(agents_of) * PER_AGENT - applied, prefix
        assert {e["code"] for e in refusals} == {"insufficient_budget"}, prefix
        named = {e["limited_by"] for e in refusals}
        assert bound in named, (prefix, named)
        assert named <= {bound, *agents_of}, (prefix, named)
