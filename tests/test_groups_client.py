"""Group budgets through the SDK, against the real worker, broker and both databases."""

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.amqp_helpers import open_amqp
from tests.eventually import eventually
from tests.support import unique
from token_budget.client import (
    BudgetClient,
    GroupNotFoundError,
    HoldsOpenError,
    InsufficientBudgetError,
)
from token_budget.schemas import Consistency, Period, ThresholdCrossedEvent


async def tree(client: BudgetClient, org_tokens: int, team_tokens: int) -> tuple[str, str]:
    """A new org → team, each with its allocation."""
    org, team = unique("org"), unique("team")
    await client.register_group(org)
    await client.register_group(team, parent_id=org)
    await client.allocate_group(org, org_tokens)
    await client.allocate_group(team, team_tokens)
    return org, team


async def member(client: BudgetClient, group_id: str, tokens: int) -> str:
    """A new agent in ``group_id`` with ``tokens`` of its own."""
    agent = unique("agent")
    await client.register_agent(agent, group_id=group_id)
    await client.allocate(agent, tokens)
    return agent


async def test_a_members_consume_is_charged_at_every_level(client: BudgetClient) -> None:
    org, team = await tree(client, 1_000, 500)
    agent = await member(client, team, 300)
    await client.consume_and_wait(agent, 120)
    team_view, org_view = await client.get_group_budget(team), await client.get_group_budget(org)
    assert (team_view.used_tokens, team_view.available_tokens) == (120, 380)
    assert (org_view.used_tokens, org_view.available_tokens) == (120, 880)
    assert await client.get_group_available(org) == 880


async def test_a_fire_and_forget_consume_reaches_the_group(client: BudgetClient) -> None:
    _, team = await tree(client, 1_000, 500)
    agent = await member(client, team, 300)
    await client.consume(agent, 40)
    await eventually(
        lambda: client.get_group_available(team),
        within=20,
        what="the member's consume charged to its team",
        done=lambda available: available == 460,
    )


async def test_a_refusal_by_the_org_names_it_in_limited_by(client: BudgetClient) -> None:
    org, team = await tree(client, 100, 1_000)
    agent = await member(client, team, 1_000)
    with pytest.raises(InsufficientBudgetError) as refused:
        await client.consume_and_wait(agent, 150)
    assert refused.value.limited_by == org
    assert (await client.get_group_budget(org)).used_tokens == 0


async def test_a_member_limited_by_its_own_budget_is_named_itself(client: BudgetClient) -> None:
    _, team = await tree(client, 1_000, 1_000)
    agent = await member(client, team, 50)
    with pytest.raises(InsufficientBudgetError) as refused:
        await client.consume_and_wait(agent, 60)
    assert refused.value.limited_by == agent


async def test_an_agent_in_no_group_is_refused_without_limited_by(client: BudgetClient) -> None:
    agent = unique("agent")
    await client.register_agent(agent)
    await client.allocate(agent, 10)
    with pytest.raises(InsufficientBudgetError) as refused:
        await client.consume_and_wait(agent, 11)
    assert refused.value.limited_by is None


async def test_a_group_view_names_the_group_and_no_agent(client: BudgetClient) -> None:
    group = unique("group")
    view = await client.register_group(group)
    assert (view.group_id, view.agent_id) == (group, None)
    assert (view.allocated_tokens, view.available_tokens) == (None, None)
    assert await client.get_group_available(group) is None


async def test_a_group_without_allocation_limits_nobody(client: BudgetClient) -> None:
    group = unique("group")
    await client.register_group(group)
    agent = await member(client, group, 100)
    view = await client.consume_and_wait(agent, 100)
    assert view.available_tokens == 0
    assert (await client.get_group_budget(group)).used_tokens == 100


GroupCall = Callable[[BudgetClient, str], Awaitable[Any]]


@pytest.mark.parametrize(
    "call",
    [
        lambda c, g: c.register_group(unique("child"), parent_id=g),
        lambda c, g: c.register_agent(unique("agent"), group_id=g),
        lambda c, g: c.get_group_budget(g),
        lambda c, g: c.allocate_group(g, 10),
    ],
    ids=["parent", "agent-group", "get-budget", "allocate"],
)
async def test_an_unknown_group_raises_group_not_found(
    client: BudgetClient, call: GroupCall
) -> None:
    with pytest.raises(GroupNotFoundError) as refused:
        await call(client, unique("nogroup"))
    assert refused.value.code == "group_not_found"


async def test_moving_an_agent_with_an_open_hold_raises_holds_open(client: BudgetClient) -> None:
    _, team = await tree(client, 1_000, 1_000)
    other = unique("other")
    await client.register_group(other)
    agent = await member(client, team, 500)
    await client.reserve(agent, 100)
    with pytest.raises(HoldsOpenError) as refused:
        await client.set_group(agent, other)
    assert refused.value.code == "holds_open"


async def test_a_moved_agent_charges_its_new_group_from_now_on(client: BudgetClient) -> None:
    _, team = await tree(client, 1_000, 1_000)
    other = unique("other")
    await client.register_group(other)
    agent = await member(client, team, 500)
    await client.consume_and_wait(agent, 30)
    moved = await client.set_group(agent, other)
    assert moved.agent_id == agent
    await client.consume_and_wait(agent, 20)
    assert (await client.get_group_budget(team)).used_tokens == 30
    assert (await client.get_group_budget(other)).used_tokens == 20


async def test_the_committed_group_budget_is_read_from_the_queries_queue(
    client: BudgetClient,
) -> None:
    _, team = await tree(client, 1_000, 500)
    agent = await member(client, team, 300)
    await client.consume_and_wait(agent, 75)
    view = await client.get_group_budget(team, consistency=Consistency.COMMITTED)
    assert (view.group_id, view.agent_id, view.consistency) == (team, None, Consistency.COMMITTED)
    assert (view.used_tokens, view.available_tokens) == (75, 425)
    assert view.as_of is not None


async def test_a_group_period_is_set_and_shown(client: BudgetClient) -> None:
    group = unique("group")
    await client.register_group(group)
    await client.allocate_group(group, 100)
    view = await client.set_group_period(group, "day", timezone="Europe/Berlin")
    assert (view.group_id, view.period, view.timezone) == (group, Period.DAY, "Europe/Berlin")
    assert view.resets_at is not None and view.resets_at.hour == 0
    cleared = await client.set_group_period(group, None)
    assert (cleared.period, cleared.resets_at) == (None, None)


async def test_a_group_threshold_is_published_with_the_group(
    client: BudgetClient, amqp_url: str
) -> None:
    group = unique("group")
    await client.register_group(group)
    await client.allocate_group(group, 100)
    await client.set_group_thresholds(group, [30])
    agent = await member(client, group, 1_000)
    async with open_amqp(amqp_url) as amqp:
        events = await amqp.bind_events("budget.threshold.#")
        await client.consume_and_wait(agent, 40)
        [message] = await events.wait_count(1)
    event = ThresholdCrossedEvent.model_validate_json(message.body)
    assert (event.group_id, event.agent_id, event.threshold) == (group, agent, 30)
    assert (event.allocated_tokens, event.used_tokens) == (100, 40)
