"""``budgetctl group …`` and ``register --group`` as an operator runs them."""

import json

import pytest

from tests.support import unique
from tests.test_ctl import Ctl, Run, run_ctl
from token_budget.client import BudgetClient
from token_budget.worker.app import Worker
from token_budget.worker.exitcodes import ExitCode


@pytest.fixture
def ctl(worker: Worker, amqp_url: str, database_url: str) -> Ctl:
    """budgetctl configured like the worker, through its environment variables."""
    env = {"BUDGET_AMQP_URL": amqp_url, "BUDGET_DATABASE_URL": database_url}

    async def call(*args: str) -> Run:
        return await run_ctl(*args, env=env)

    return call


async def org_and_team(client: BudgetClient) -> tuple[str, str]:
    """org (1,000) → team (no allocation)."""
    org, team = unique("org"), unique("team")
    await client.register_group(org)
    await client.register_group(team, parent_id=org)
    await client.allocate_group(org, 1_000)
    return org, team


async def test_group_create_prints_a_group_without_allocation(ctl: Ctl) -> None:
    group = unique("group")
    run = await ctl("group", "create", group)
    expected = f"{group}: allocated=- used=0 reserved=0 available=-\n"
    assert (run.code, run.out) == (0, expected), run.err


async def test_group_create_under_an_unknown_parent_is_refused(ctl: Ctl) -> None:
    run = await ctl("group", "create", unique("group"), "--parent", "nosuchgroup")
    assert (run.code, run.out) == (ExitCode.REFUSED, ""), run.err
    assert run.err.startswith("budgetctl: refused: group_not_found: ")


async def test_group_allocate_prints_the_groups_budget(ctl: Ctl, client: BudgetClient) -> None:
    group = unique("group")
    await client.register_group(group)
    run = await ctl("group", "allocate", group, "500")
    expected = f"{group}: allocated=500 used=0 reserved=0 available=500\n"
    assert (run.code, run.out) == (0, expected), run.err


async def test_register_with_group_charges_the_group(ctl: Ctl, client: BudgetClient) -> None:
    org, team = await org_and_team(client)
    agent = unique("agent")
    run = await ctl("register", agent, "--group", team)
    assert (run.code, run.out) == (0, f"{agent}: registered, no budget yet\n"), run.err
    await client.allocate(agent, 100)
    await client.consume_and_wait(agent, 25)
    assert (await client.get_group_budget(org)).used_tokens == 25


async def test_group_show_prints_the_budget_as_text_or_json(ctl: Ctl, client: BudgetClient) -> None:
    org, team = await org_and_team(client)
    agent = unique("agent")
    await client.register_agent(agent, group_id=team)
    await client.allocate(agent, 100)
    await client.consume_and_wait(agent, 40)
    text, as_json = await ctl("group", "show", org), await ctl("group", "show", org, "--json")
    expected = f"{org}: allocated=1000 used=40 reserved=0 available=960\n"
    assert (text.code, text.out) == (0, expected), text.err
    assert json.loads(as_json.out) == {
        "group_id": org,
        "allocated_tokens": 1000,
        "used_tokens": 40,
        "reserved_tokens": 0,
        "available_tokens": 960,
    }


async def test_group_move_moves_the_agent_and_none_takes_it_out(
    ctl: Ctl, client: BudgetClient
) -> None:
    org, team = await org_and_team(client)
    agent = unique("agent")
    await client.register_agent(agent, group_id=team)
    await client.allocate(agent, 100)
    moved = await ctl("group", "move", agent, org)
    expected = f"{agent}: allocated=100 used=0 reserved=0 available=100\n"
    assert (moved.code, moved.out) == (0, expected), moved.err
    await client.consume_and_wait(agent, 10)
    out = await ctl("group", "move", agent, "none")
    assert out.code == 0, out.err
    await client.consume_and_wait(agent, 5)
    assert (await client.get_group_budget(org)).used_tokens == 10
    assert (await client.get_group_budget(team)).used_tokens == 0


async def test_group_move_with_an_open_hold_is_refused(ctl: Ctl, client: BudgetClient) -> None:
    org, team = await org_and_team(client)
    agent = unique("agent")
    await client.register_agent(agent, group_id=team)
    await client.allocate(agent, 100)
    await client.reserve(agent, 10)
    run = await ctl("group", "move", agent, org)
    assert (run.code, run.out) == (ExitCode.REFUSED, ""), run.err
    assert run.err.startswith("budgetctl: refused: holds_open: ")


async def test_group_tree_indents_groups_and_their_agents(ctl: Ctl, client: BudgetClient) -> None:
    org, team = await org_and_team(client)
    agent, idle = unique("agent"), unique("agent")
    await client.register_agent(agent, group_id=team)
    await client.register_agent(idle, group_id=org)
    await client.allocate(agent, 100)
    await client.consume_and_wait(agent, 30)
    await client.reserve(agent, 20)
    run = await ctl("group", "tree", org)
    assert (run.code, run.out) == (
        0,
        f"{org}: allocated=1000 used=30 reserved=20 available=950\n"
        f"  {idle}: registered, no budget yet\n"
        f"  {team}: allocated=- used=30 reserved=20 available=-\n"
        f"    {agent}: allocated=100 used=30 reserved=20 available=50\n",
    ), run.err


async def test_group_tree_json_gives_each_line_its_depth(ctl: Ctl, client: BudgetClient) -> None:
    org, team = await org_and_team(client)
    agent = unique("agent")
    await client.register_agent(agent, group_id=team)
    await client.allocate(agent, 100)
    run = await ctl("group", "tree", "--json")
    assert run.code == 0, run.err
    rows = [json.loads(line) for line in run.out.splitlines()]
    assert [(r.get("group_id"), r.get("agent_id"), r["depth"]) for r in rows] == [
        (org, None, 0),
        (team, None, 1),
        (team, agent, 2),
    ]
    assert rows[1] == {
        "group_id": team,
        "parent_id": org,
        "depth": 1,
        "allocated_tokens": None,
        "used_tokens": 0,
        "reserved_tokens": 0,
        "available_tokens": None,
    }


async def test_group_tree_of_an_unknown_root_exits_1(ctl: Ctl) -> None:
    run = await ctl("group", "tree", "nosuchgroup")
    assert (run.code, run.out) == (ExitCode.REFUSED, ""), run.err
    assert "group_not_found" in run.err and "'nosuchgroup'" in run.err


async def test_reconcile_exits_zero_after_members_consume(ctl: Ctl, client: BudgetClient) -> None:
    _, team = await org_and_team(client)
    agents = [unique("agent") for _ in range(3)]
    for agent in agents:
        await client.register_agent(agent, group_id=team)
        await client.allocate(agent, 100)
        await client.consume_and_wait(agent, 10)
        await client.consume_and_wait(agent, 15)
    run = await ctl("reconcile")
    assert (run.code, run.out) == (0, "books reconcile: no difference\n"), run.err
