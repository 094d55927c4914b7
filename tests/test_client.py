"""The SDK against the real worker, broker and both databases."""

import asyncio

import pytest
from pydantic import ValidationError

from tests.amqp_helpers import connect, connection_name
from tests.eventually import eventually
from tests.inprocess import running
from tests.support import funded, unique
from token_budget.client import (
    AgentNotFoundError,
    BrokerUnavailable,
    BudgetClient,
    BudgetNotFoundError,
    CommandRefused,
    ConflictError,
    InsufficientBudgetError,
    NotDelivered,
    NoWorker,
    ReplyQueue,
    RequestTimeout,
    refusal_for,
    refusal_from_wire,
)
from token_budget.client.errors import _BY_CODE
from token_budget.schemas import (
    COMMANDS_EXCHANGE,
    BudgetView,
    ErrorBody,
    ErrorCode,
    GetBudget,
    OkReply,
    lane_queue_name,
)
from token_budget.worker.app import Worker
from token_budget.worker.broker.topology import TopologySpec, declare_topology
from token_budget.worker.settings import Settings

REPLY_QUEUES: list[ReplyQueue] = ["direct", "exclusive"]


def view(agent: str, allocated: int | None, used: int | None) -> BudgetView:
    available = None if allocated is None or used is None else allocated - used
    return BudgetView(
        agent_id=agent, allocated_tokens=allocated, used_tokens=used, available_tokens=available
    )


# -- happy paths -------------------------------------------------------------


async def test_register_agent_returns_a_view_without_budget(client: BudgetClient) -> None:
    agent = unique("agent")
    assert await client.register_agent(agent) == view(agent, None, None)


async def test_allocate_adds_to_the_budget(client: BudgetClient) -> None:
    agent = unique("agent")
    await client.register_agent(agent)
    assert await client.allocate(agent, 100) == view(agent, 100, 0)
    assert await client.allocate(agent, 50) == view(agent, 150, 0)


async def test_consume_and_wait_returns_the_budget_after_consuming(client: BudgetClient) -> None:
    agent = await funded(client, 100)
    assert await client.consume_and_wait(agent, 30) == view(agent, 100, 30)


async def test_get_budget_and_get_available_read_the_balance(client: BudgetClient) -> None:
    agent = await funded(client, 100)
    await client.consume_and_wait(agent, 40)
    assert await client.get_budget(agent) == view(agent, 100, 40)
    assert await client.get_available(agent) == 60


async def test_request_sends_any_command_and_returns_the_ok_reply(client: BudgetClient) -> None:
    agent = await funded(client, 7)
    reply = await client.request(GetBudget(type="get_budget", agent_id=agent))
    assert reply == OkReply(agent_id=agent, allocated_tokens=7, used_tokens=0, available_tokens=7)


async def test_consume_is_confirmed_then_applied(client: BudgetClient) -> None:
    agent = await funded(client, 100)
    message_id = await client.consume(agent, 25, message_id=unique("m"))
    assert message_id.startswith("m-")
    await eventually(
        lambda: client.get_available(agent),
        within=20,
        what="the consume applied",
        done=lambda available: available == 75,
    )


async def test_consume_returns_a_new_message_id_by_default(client: BudgetClient) -> None:
    agent = await funded(client, 100)
    first, second = await client.consume(agent, 1), await client.consume(agent, 1)
    assert first != second and len(first) == 32
    await eventually(
        lambda: client.get_available(agent),
        within=20,
        what="both consumes applied",
        done=lambda available: available == 98,
    )


async def test_concurrent_requests_each_get_their_own_reply(client: BudgetClient) -> None:
    agents = [await funded(client, 10 + n) for n in range(20)]
    available = await asyncio.gather(*(client.get_available(agent) for agent in agents))
    assert available == [10 + n for n in range(20)]
    assert client.pending_requests == 0


@pytest.mark.parametrize("reply_queue", REPLY_QUEUES)
async def test_rpc_works_over_each_kind_of_reply_queue(
    worker: Worker, amqp_url: str, reply_queue: ReplyQueue
) -> None:
    async with BudgetClient.connect(
        amqp_url, timeout=20, name=connection_name(), reply_queue=reply_queue
    ) as client:
        agent = unique("agent")
        await client.register_agent(agent)
        await client.allocate(agent, 10)
        assert await client.consume_and_wait(agent, 4) == view(agent, 10, 4)
        assert await client.get_available(agent) == 6


async def test_awaited_connect_and_close(worker: Worker, amqp_url: str) -> None:
    client = await BudgetClient.connect(amqp_url, timeout=20, name=connection_name())
    try:
        agent = unique("agent")
        assert await client.register_agent(agent) == view(agent, None, None)
    finally:
        await client.close()


# -- refusals ----------------------------------------------------------------


async def test_insufficient_budget_raises_with_requested_and_available(
    client: BudgetClient,
) -> None:
    agent = await funded(client, 10)
    with pytest.raises(InsufficientBudgetError) as caught:
        await client.consume_and_wait(agent, 11)
    assert caught.value.code == "insufficient_budget"
    assert (caught.value.requested_tokens, caught.value.available_tokens) == (11, 10)
    assert await client.get_available(agent) == 10


async def test_unknown_agent_raises_agent_not_found(client: BudgetClient) -> None:
    with pytest.raises(AgentNotFoundError) as caught:
        await client.allocate(unique("ghost"), 5)
    assert caught.value.code == "agent_not_found"


async def test_agent_without_budget_raises_budget_not_found(client: BudgetClient) -> None:
    agent = unique("agent")
    await client.register_agent(agent)
    with pytest.raises(BudgetNotFoundError):
        await client.get_budget(agent)


async def test_retry_with_the_same_message_id_returns_the_first_view(
    client: BudgetClient,
) -> None:
    agent = unique("agent")
    await client.register_agent(agent)
    message_id = unique("alloc")
    first = await client.allocate(agent, 100, message_id=message_id)
    again = await client.allocate(agent, 100, message_id=message_id)
    assert first == again == view(agent, 100, 0)
    assert await client.get_budget(agent) == view(agent, 100, 0)


async def test_same_message_id_for_another_command_raises_conflict(client: BudgetClient) -> None:
    agent = await funded(client, 100)
    message_id = unique("m")
    await client.consume_and_wait(agent, 1, message_id=message_id)
    with pytest.raises(ConflictError):
        await client.consume_and_wait(agent, 2, message_id=message_id)


async def test_bad_amount_is_refused_before_publishing(amqp_url: str) -> None:
    # No topology on this vhost: a command that got published would raise NotDelivered.
    async with BudgetClient.connect(amqp_url, timeout=20, name=connection_name()) as client:
        with pytest.raises(ValidationError):
            await client.allocate("agent-1", 0)
        with pytest.raises(ValidationError):
            await client.consume("agent-1", 2**53 + 1)
        with pytest.raises(ValidationError):
            await client.register_agent("not an agent id")


def test_every_error_code_maps_to_its_own_exception() -> None:
    for code in ErrorCode:
        refusal = refusal_for(ErrorBody(code=code, message="m"))
        assert type(refusal) is _BY_CODE[code] and refusal.code == code.value


def test_unknown_error_code_maps_to_command_refused() -> None:
    refusal = refusal_from_wire({"code": "quota_frozen", "message": "m", "until": "later"})
    assert type(refusal) is CommandRefused
    assert (refusal.code, refusal.message, refusal.body) == ("quota_frozen", "m", None)


# -- delivery failures and timeouts --------------------------------------------


async def _declare(amqp_url: str, *, lanes: bool) -> None:
    connection = await connect(amqp_url)
    try:
        if lanes:
            await declare_topology(connection, TopologySpec(partitions=2, delivery_limit=5))
        else:
            channel = await connection.channel()
            await channel.declare_exchange(COMMANDS_EXCHANGE, "fanout", durable=True)
    finally:
        await connection.close()


@pytest.mark.parametrize("reply_queue", REPLY_QUEUES)
async def test_missing_exchange_raises_not_delivered(
    amqp_url: str, reply_queue: ReplyQueue
) -> None:
    async with BudgetClient.connect(
        amqp_url, timeout=20, name=connection_name(), reply_queue=reply_queue
    ) as client:
        with pytest.raises(NotDelivered, match="does not exist"):
            await client.consume("agent-1", 5)
        # The broker closed the channel; the client reopens it for the next call.
        with pytest.raises(NotDelivered, match="does not exist"):
            await client.register_agent("agent-1")
        assert client.pending_requests == 0


async def test_exchange_without_lanes_returns_the_command_as_not_delivered(amqp_url: str) -> None:
    await _declare(amqp_url, lanes=False)
    async with BudgetClient.connect(amqp_url, timeout=20, name=connection_name()) as client:
        with pytest.raises(NotDelivered, match="unroutable"):
            await client.consume("agent-1", 5)
        with pytest.raises(NotDelivered, match="unroutable"):
            await client.get_budget("agent-1")


@pytest.mark.parametrize("reply_queue", REPLY_QUEUES)
async def test_client_works_once_a_worker_starts_after_not_delivered(
    amqp_url: str, worker_settings: Settings, reply_queue: ReplyQueue
) -> None:
    async with BudgetClient.connect(
        amqp_url, timeout=20, name=connection_name(), reply_queue=reply_queue
    ) as client:
        with pytest.raises(NotDelivered):
            await client.register_agent("agent-1")
        async with running(Worker(worker_settings)):
            assert await client.register_agent("agent-1") == view("agent-1", None, None)


@pytest.mark.parametrize("reply_queue", REPLY_QUEUES)
async def test_no_reply_with_nobody_on_the_lanes_raises_no_worker_and_forgets_the_request(
    amqp_url: str, reply_queue: ReplyQueue
) -> None:
    await _declare(amqp_url, lanes=True)  # lanes bound, nobody consuming
    async with BudgetClient.connect(
        amqp_url, timeout=20, name=connection_name(), reply_queue=reply_queue
    ) as client:
        with pytest.raises(NoWorker) as caught:
            await client.request(GetBudget(type="get_budget", agent_id="agent-1"), timeout=0.3)
        assert isinstance(caught.value, RequestTimeout)  # what older callers catch
        assert caught.value.code == "no_worker"
        assert "no worker is consuming the lanes" in caught.value.message
        assert "may or may not" not in caught.value.message  # a query changes nothing
        assert client.pending_requests == 0


async def _ignore(_message: object) -> None:
    """A consumer that takes deliveries and never answers."""


async def test_an_unanswered_query_with_a_worker_on_the_lanes_is_a_plain_timeout(
    amqp_url: str,
) -> None:
    await _declare(amqp_url, lanes=True)
    silent = await connect(amqp_url)
    try:
        # A consumer that never answers, on every lane: a worker stuck or slow.
        channel = await silent.channel()
        for index in range(2):
            queue = await channel.get_queue(lane_queue_name(index), ensure=False)
            await queue.consume(_ignore)
        async with BudgetClient.connect(amqp_url, timeout=20, name=connection_name()) as client:
            with pytest.raises(RequestTimeout) as caught:
                await client.request(GetBudget(type="get_budget", agent_id="agent-1"), timeout=0.3)
    finally:
        await silent.close()
    assert caught.value.code == "timeout"
    assert "may or may not" not in caught.value.message
    assert "retry" in caught.value.message


async def test_a_budget_client_counts_the_workers_on_the_lanes(
    client: BudgetClient, amqp_url: str
) -> None:
    assert await client.lane_consumers() == 1


async def test_retry_after_timeout_with_the_same_message_id_gets_the_outcome(
    amqp_url: str, worker_settings: Settings
) -> None:
    async with running(Worker(worker_settings)):
        pass  # leaves its topology behind: lanes bound, nobody consuming
    async with BudgetClient.connect(amqp_url, timeout=20, name=connection_name()) as client:
        async with running(Worker(worker_settings)):
            await client.register_agent("agent-1")
        client.timeout = 0.3
        with pytest.raises(RequestTimeout):
            await client.allocate("agent-1", 100, message_id="alloc-1")
        client.timeout = 20
        async with running(Worker(worker_settings)):
            # The first allocate waited in its lane and is applied when a worker
            # comes; its late reply is dropped, and the retry is answered from
            # the stored outcome: one allocation, not two.
            retried = await client.allocate("agent-1", 100, message_id="alloc-1")
            assert retried == view("agent-1", 100, 0)
            assert await client.get_budget("agent-1") == view("agent-1", 100, 0)
            assert client.pending_requests == 0


async def test_unreachable_broker_raises_broker_unavailable() -> None:
    with pytest.raises(BrokerUnavailable) as caught:
        await BudgetClient.connect(
            "amqp://guest:guest@127.0.0.1:1/", timeout=5, name=connection_name()
        )
    assert isinstance(caught.value, NotDelivered)
