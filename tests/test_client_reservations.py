"""The SDK's reservation pattern against the real worker, broker and both databases."""

import asyncio
import random

import pytest

from tests.db_helpers import reader
from tests.support import funded
from token_budget.client import (
    BudgetClient,
    InsufficientBudgetError,
    ReservationClosedError,
    ReservationNotFoundError,
)
from token_budget.worker.store.audit import history, reconcile


class Boom(Exception):
    pass


async def test_the_reservation_commits_the_reported_usage_on_exit(client: BudgetClient) -> None:
    agent = await funded(client, 1000)
    async with client.reservation(agent, 400) as hold:
        held = await client.get_budget(agent)
        hold.used(123)
    assert (held.reserved_tokens, held.available_tokens) == (400, 600)
    after = await client.get_budget(agent)
    assert (after.used_tokens, after.reserved_tokens, after.available_tokens) == (123, 0, 877)


async def test_a_reservation_without_reported_usage_commits_the_whole_hold(
    client: BudgetClient,
) -> None:
    agent = await funded(client, 1000)
    async with client.reservation(agent, 400):
        pass
    after = await client.get_budget(agent)
    assert (after.used_tokens, after.reserved_tokens) == (400, 0)


async def test_an_error_in_the_body_releases_the_hold(client: BudgetClient) -> None:
    agent = await funded(client, 1000)
    with pytest.raises(Boom):
        async with client.reservation(agent, 400):
            raise Boom()
    after = await client.get_budget(agent)
    assert (after.used_tokens, after.reserved_tokens, after.available_tokens) == (0, 0, 1000)


async def test_usage_reported_before_an_error_is_still_committed(client: BudgetClient) -> None:
    agent = await funded(client, 1000)
    with pytest.raises(Boom):
        async with client.reservation(agent, 400) as hold:
            hold.used(50)
            raise Boom()
    assert (await client.get_budget(agent)).used_tokens == 50


async def test_a_refused_reservation_never_runs_the_body(client: BudgetClient) -> None:
    agent = await funded(client, 100)
    ran = False
    with pytest.raises(InsufficientBudgetError) as refused:
        async with client.reservation(agent, 101):
            ran = True
    assert not ran
    assert (refused.value.requested_tokens, refused.value.available_tokens) == (101, 100)


async def test_reserve_retried_with_its_message_id_names_the_same_reservation(
    client: BudgetClient,
) -> None:
    agent = await funded(client, 100)
    first = await client.reserve(agent, 30, ttl_seconds=120, message_id=f"{agent}:r1")
    again = await client.reserve(agent, 30, ttl_seconds=120, message_id=f"{agent}:r1")
    assert again.reservation_id == first.reservation_id
    assert again.expires_at == first.expires_at
    assert (await client.get_budget(agent)).reserved_tokens == 30


async def test_settling_an_unknown_or_settled_reservation_raises_its_typed_error(
    client: BudgetClient,
) -> None:
    agent = await funded(client, 100)
    hold = await client.reserve(agent, 30)
    await client.commit(agent, hold.reservation_id, 10)
    with pytest.raises(ReservationClosedError):
        await client.release(agent, hold.reservation_id)
    with pytest.raises(ReservationNotFoundError):
        await client.commit(agent, "no-such-reservation", 1)
    assert (await client.get_budget(agent)).used_tokens == 10


async def test_concurrent_reservations_over_the_broker_never_overdraw(
    client: BudgetClient, database_url: str
) -> None:
    agents = [await funded(client, 500) for _ in range(4)]
    rng = random.Random(6)
    committed: dict[str, int] = dict.fromkeys(agents, 0)

    async def call(agent: str, hold_size: int, used: int) -> None:
        try:
            async with client.reservation(agent, hold_size) as hold:
                await asyncio.sleep(0)  # the "LLM call": other holds interleave here
                hold.used(used)
        except InsufficientBudgetError:
            return
        except ReservationClosedError:  # cannot happen with the default TTL
            raise
        committed[agent] += used

    calls = [
        call(agent, rng.randint(20, 120), rng.randint(0, 140))
        for _ in range(15)
        for agent in agents
    ]
    # A reserve, or a commit over its hold, is refused once the budget is short
    # (``call`` counts neither); any other error fails the test here.
    await asyncio.gather(*calls)
    for agent in agents:
        view = await client.get_budget(agent)
        assert view.used_tokens is not None and view.reserved_tokens is not None
        assert view.used_tokens + view.reserved_tokens <= 500
        assert view.used_tokens == committed[agent]
    async with reader(database_url) as engine:
        assert await reconcile(engine) == []
        kinds = {entry.kind for agent in agents for entry in await history(engine, agent)}
    assert {"reserve", "settle", "commit"} <= kinds
