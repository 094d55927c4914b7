"""The worker end to end, in process, against the real broker and both databases."""

import asyncio
import random
from urllib.parse import quote

import pytest

from tests.amqp_helpers import Amqp, Outgoing, ask, command, open_amqp, setup_agent
from tests.db_helpers import balances, ledger_ids, reader
from tests.inprocess import running
from tests.support import RabbitAdmin
from token_budget.schemas import (
    DEAD_LETTER_QUEUE,
    DIRECT_REPLY_TO,
    HEADER_DUPLICATE,
    ErrorReply,
    OkReply,
    RefusedEvent,
    lane_queue_name,
    parse_reply,
)
from token_budget.worker.app import Worker
from token_budget.worker.broker.topology import PluginMissing, TopologySpec
from token_budget.worker.settings import Settings


async def test_duplicate_message_id_is_applied_once_and_answered_identically(
    worker: Worker, amqp_url: str, database_url: str
) -> None:
    async with open_amqp(amqp_url) as amqp:
        await setup_agent(amqp, "dup", 100)
        reply_to, replies = await amqp.reply_queue()
        for attempt in ("first", "second"):
            await amqp.publish(
                Outgoing(
                    command("consume", "dup", 7),
                    "dup",
                    message_id="dup:consume-1",
                    reply_to=reply_to,
                    correlation_id=attempt,
                )
            )
        first, second = await replies.reply("first"), await replies.reply("second")

    assert parse_reply(first.body) == OkReply(
        agent_id="dup", allocated_tokens=100, used_tokens=7, available_tokens=93
    )
    assert second.body == first.body
    assert HEADER_DUPLICATE not in (first.headers or {})
    assert (second.headers or {}).get(HEADER_DUPLICATE) is True
    async with reader(database_url) as engine:
        assert await balances(engine) == {"dup": (100, 7)}
        assert await ledger_ids(engine) == {"dup": ["dup:allocate", "dup:consume-1"]}


async def test_reused_message_id_with_other_content_is_a_conflict_not_a_dead_letter(
    worker: Worker, amqp_url: str, database_url: str
) -> None:
    async with open_amqp(amqp_url) as amqp:
        await setup_agent(amqp, "reuse", 100)
        await ask(amqp, Outgoing(command("consume", "reuse", 5), "reuse", message_id="reuse:1"))
        body, headers = await ask(
            amqp, Outgoing(command("consume", "reuse", 6), "reuse", message_id="reuse:1")
        )
        # Answered after the conflict's batch was settled, so a dead letter
        # for it, had there been one, would be in the queue by now.
        await ask(amqp, Outgoing(command("get_budget", "reuse"), "reuse"))
        dead_letters = await amqp.ready_count(DEAD_LETTER_QUEUE)

    reply = parse_reply(body)
    assert isinstance(reply, ErrorReply)
    assert reply.error.code == "conflict"
    assert "'reuse:1'" in reply.error.message
    assert HEADER_DUPLICATE not in headers
    assert dead_letters == 0
    async with reader(database_url) as engine:
        assert await balances(engine) == {"reuse": (100, 5)}


async def test_refused_consume_leaves_the_budget_unchanged(
    worker: Worker, amqp_url: str, database_url: str
) -> None:
    async with open_amqp(amqp_url) as amqp:
        await setup_agent(amqp, "thrifty", 10)
        await ask(amqp, Outgoing(command("consume", "thrifty", 4), "thrifty", message_id="t:1"))
        body, _ = await ask(
            amqp, Outgoing(command("consume", "thrifty", 7), "thrifty", message_id="t:2")
        )
        after, _ = await ask(amqp, Outgoing(command("get_budget", "thrifty"), "thrifty"))

    reply = parse_reply(body)
    assert isinstance(reply, ErrorReply)
    assert reply.error.code == "insufficient_budget"
    assert (reply.error.requested_tokens, reply.error.available_tokens) == (7, 6)
    assert parse_reply(after) == OkReply(
        agent_id="thrifty", allocated_tokens=10, used_tokens=4, available_tokens=6
    )
    async with reader(database_url) as engine:
        assert await balances(engine) == {"thrifty": (10, 4)}
        assert await ledger_ids(engine) == {"thrifty": ["thrifty:allocate", "t:1"]}


@pytest.mark.sqlite_only
async def test_refused_fire_and_forget_command_is_announced_as_an_event(
    worker: Worker, amqp_url: str
) -> None:
    async with open_amqp(amqp_url) as amqp:
        events = await amqp.bind_events("budget.refused.#")
        await setup_agent(amqp, "quiet", 5)
        # Refused with reply_to: the reply says so, no event.
        await ask(amqp, Outgoing(command("consume", "quiet", 8), "quiet", message_id="q:1"))
        await amqp.publish(Outgoing(command("consume", "quiet", 9), "quiet", message_id="q:2"))
        [event] = await events.wait_count(1)

    assert event.routing_key == "budget.refused.insufficient_budget"
    assert event.content_type == "application/json"
    refused = RefusedEvent.model_validate_json(event.body)
    assert (refused.agent_id, refused.command_type, refused.message_id, refused.tokens) == (
        "quiet",
        "consume",
        "q:2",
        9,
    )
    assert refused.error.code == "insufficient_budget"
    assert (refused.error.requested_tokens, refused.error.available_tokens) == (9, 5)


@pytest.mark.sqlite_only
@pytest.mark.parametrize("route", ["direct_reply_to", "reply_queue"])
async def test_replies_carry_the_correlation_id_or_else_the_message_id(
    worker: Worker, amqp_url: str, route: str
) -> None:
    async with open_amqp(amqp_url) as amqp:
        if route == "direct_reply_to":
            reply_to, replies = DIRECT_REPLY_TO, await amqp.direct_reply_to()
        else:
            reply_to, replies = await amqp.reply_queue()
        await amqp.publish(
            Outgoing(
                command("register_agent", "r"),
                "r",
                message_id="r:1",
                reply_to=reply_to,
                correlation_id="corr-1",
            )
        )
        await amqp.publish(
            Outgoing(command("register_agent", "r"), "r", message_id="r:2", reply_to=reply_to)
        )
        with_correlation, without = await replies.reply("corr-1"), await replies.reply("r:2")

    for reply in (with_correlation, without):
        assert parse_reply(reply.body) == OkReply(
            agent_id="r", allocated_tokens=None, used_tokens=None, available_tokens=None
        )


async def test_each_agents_commands_apply_in_published_order(
    worker: Worker, amqp_url: str, database_url: str
) -> None:
    agents = [f"agent-{n:02d}" for n in range(40)]
    rng = random.Random(40)
    plans: dict[str, list[Outgoing]] = {}
    expected: dict[str, tuple[int, int, list[str]]] = {}  # allocated, used, ledger ids
    async with open_amqp(amqp_url) as amqp:
        reply_to, replies = await amqp.reply_queue()
        for n, agent in enumerate(agents):
            # Less than the consumes ask for: which ones are refused depends on order.
            allocated, used, applied = 600 + 10 * n, 0, [f"{agent}:allocate"]
            plan = [
                Outgoing(command("register_agent", agent), agent, message_id=f"{agent}:register"),
                Outgoing(
                    command("allocate", agent, allocated), agent, message_id=f"{agent}:allocate"
                ),
            ]
            for i in range(50):
                tokens, message_id = rng.randint(1, 60), f"{agent}:consume-{i}"
                plan.append(
                    Outgoing(command("consume", agent, tokens), agent, message_id=message_id)
                )
                if used + tokens <= allocated:
                    used += tokens
                    applied.append(message_id)
            plan.append(
                Outgoing(
                    command("get_budget", agent), agent, reply_to=reply_to, correlation_id=agent
                )
            )
            plans[agent], expected[agent] = plan, (allocated, used, applied)

        async def publish_interleaved(publisher: Amqp, mine: list[str]) -> None:
            for step in range(len(plans[mine[0]])):
                for agent in mine:
                    await publisher.publish(plans[agent][step])

        # Two publishers, each on its own channel, each agent's commands from one.
        first, second = (
            await amqp.another_channel(confirms=False),
            await amqp.another_channel(confirms=False),
        )
        await asyncio.gather(
            publish_interleaved(first, agents[0::2]), publish_interleaved(second, agents[1::2])
        )
        await replies.wait_count(len(agents), within=90)

    seen = {m.correlation_id: parse_reply(m.body) for m in replies.messages}
    assert seen == {
        agent: OkReply(
            agent_id=agent,
            allocated_tokens=allocated,
            used_tokens=used,
            available_tokens=allocated - used,
        )
        for agent, (allocated, used, _) in expected.items()
    }
    async with reader(database_url) as engine:
        assert await ledger_ids(engine) == {agent: ids for agent, (_, _, ids) in expected.items()}
        assert await balances(engine) == {
            agent: (allocated, used) for agent, (allocated, used, _) in expected.items()
        }


async def test_workers_starting_together_agree_on_the_topology(
    worker_settings: Settings, rabbit: RabbitAdmin, vhost: str
) -> None:
    async with running(Worker(worker_settings), Worker(worker_settings)):
        lanes = [rabbit.queue(vhost, lane_queue_name(n)) for n in range(worker_settings.partitions)]
        exchange = rabbit.call("GET", f"/exchanges/{quote(vhost, safe='')}/budget.commands")
        router = rabbit.call("GET", f"/exchanges/{quote(vhost, safe='')}/budget.lanes")
        dead = rabbit.queue(vhost, DEAD_LETTER_QUEUE)

    assert exchange["type"] == "fanout"
    assert (router["type"], router["internal"]) == ("x-modulus-hash", True)
    for lane in lanes:
        assert (lane["durable"], lane["arguments"]) == (
            True,
            {
                "x-queue-type": "quorum",
                "x-single-active-consumer": True,
                "x-delivery-limit": worker_settings.delivery_limit,
                "x-dead-letter-exchange": "budget.dead",
            },
        ), lane["name"]
    assert dead["arguments"]["x-queue-type"] == "quorum"


@pytest.mark.sqlite_only
async def test_missing_modulus_hash_exchange_fails_start_up_with_the_fix(
    worker_settings: Settings,
) -> None:
    topology = TopologySpec(
        worker_settings.partitions,
        worker_settings.delivery_limit,
        router_exchange_type="x-not-installed",
    )
    worker = Worker(worker_settings, topology=topology)
    with pytest.raises(PluginMissing) as raised:
        await asyncio.wait_for(worker.run(), 60)
    assert "rabbitmq-plugins enable rabbitmq_sharding" in str(raised.value)
