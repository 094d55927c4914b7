"""Committed queries on ``budget.queries``: answered at once, from the last commit.

The fault: the agent's lane cannot commit (a test transaction holds SQLite's
write lock, or the agent's budget row on PostgreSQL). A read-your-writes
query waits behind the stuck command; a committed one does not, says so,
and shows the state before the stuck command. Once the lock goes, the
command commits and the next committed query shows it.
"""

import json
from datetime import datetime

import aio_pika
import pytest

from tests.amqp_helpers import connection_name, open_amqp
from tests.db_helpers import lane_blocked
from tests.eventually import eventually
from tests.support import funded
from token_budget import BudgetClient, RequestTimeout
from token_budget.client import AgentNotFoundError
from token_budget.schemas import (
    CONTENT_TYPE,
    DEAD_LETTER_QUEUE,
    HEADER_ERROR_CODE,
    HEADER_LANE,
    QUERIES_QUEUE,
    Consistency,
    ErrorCode,
)
from token_budget.worker.app import Worker


async def test_a_committed_query_is_answered_while_the_agents_lane_cannot_commit(
    client: BudgetClient, amqp_url: str, database_url: str
) -> None:
    agent = await funded(client, 1000)
    await client.consume_and_wait(agent, 100)
    async with (
        BudgetClient.connect(amqp_url, timeout=2, name=connection_name()) as impatient,
        lane_blocked(database_url, agent),
    ):
        await client.consume(agent, 50)
        # Read-your-writes waits behind the consume its lane cannot commit.
        with pytest.raises(RequestTimeout):
            await impatient.get_budget(agent)
        view = await impatient.get_budget(agent, consistency=Consistency.COMMITTED)
    assert view.consistency is Consistency.COMMITTED
    assert (view.used_tokens, view.available_tokens) == (100, 900)
    assert isinstance(view.as_of, datetime)
    after = await eventually(
        lambda: client.get_budget(agent, consistency=Consistency.COMMITTED),
        within=30,
        what="the consume, committed once the lock is gone",
        done=lambda v: v.used_tokens == 150,
    )
    assert after.available_tokens == 850


async def test_a_query_on_its_lane_that_names_its_consistency_says_read_your_writes(
    client: BudgetClient,
) -> None:
    agent = await funded(client, 1000)
    await client.consume(agent, 10)
    view = await client.get_budget(agent, consistency=Consistency.READ_YOUR_WRITES)
    assert view.consistency is Consistency.READ_YOUR_WRITES
    assert view.used_tokens == 10  # behind the consume published before it
    assert isinstance(view.as_of, datetime)


async def test_a_query_that_names_no_consistency_gets_the_reply_it_always_got(
    client: BudgetClient,
) -> None:
    agent = await funded(client, 1000)
    reply = await client.get_budget(agent)
    assert reply.consistency is None and reply.as_of is None


async def test_get_available_can_ask_for_the_committed_amount(client: BudgetClient) -> None:
    agent = await funded(client, 1000)
    await client.consume_and_wait(agent, 1)
    assert await client.get_available(agent, consistency=Consistency.COMMITTED) == 999


async def test_a_committed_query_of_an_unknown_agent_is_refused_as_agent_not_found(
    client: BudgetClient,
) -> None:
    with pytest.raises(AgentNotFoundError):
        await client.get_budget("nobody-here", consistency=Consistency.COMMITTED)


@pytest.mark.sqlite_only
async def test_budget_queries_dead_letters_any_other_command_and_says_where_it_belongs(
    worker: Worker, amqp_url: str
) -> None:
    async with open_amqp(amqp_url) as amqp:
        replies = await amqp.direct_reply_to()
        body = json.dumps({"type": "consume", "agent_id": "a1", "tokens": 5}).encode()
        message = aio_pika.Message(
            body,
            content_type=CONTENT_TYPE,
            message_id="m-queries-1",
            correlation_id="c-queries-1",
            reply_to="amq.rabbitmq.reply-to",
        )
        await amqp.channel.default_exchange.publish(message, routing_key=QUERIES_QUEUE)
        reply = json.loads((await replies.reply("c-queries-1")).body)
        assert reply["ok"] is False
        assert reply["error"]["code"] == ErrorCode.INVALID_COMMAND
        assert "budget.commands" in reply["error"]["message"]
        [dead] = await eventually(
            lambda: amqp.take_all(DEAD_LETTER_QUEUE), within=30, what="the dead letter"
        )
    headers = dead.headers or {}
    assert headers[HEADER_ERROR_CODE] == ErrorCode.INVALID_COMMAND
    assert headers[HEADER_LANE] == -1
    assert dead.body == body
