"""Routing: every agent on the lane the lane map names, a guard against any
other lane, and the upgrade from the legacy consistent-hash exchange.

All against the real broker (``x-modulus-hash`` of rabbitmq_sharding on 3.10).
"""

import json
import re
import urllib.error
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.amqp_helpers import (
    Amqp,
    Outgoing,
    ask,
    command,
    connect,
    connection_name,
    open_amqp,
    setup_agent,
)
from tests.db_helpers import balances, ledger_ids, reader
from tests.eventually import eventually
from tests.inprocess import running
from tests.processes import WorkerProcess
from tests.support import RabbitAdmin
from tests.workload import make_workload
from token_budget.client import BudgetClient
from token_budget.schemas import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_QUEUE,
    HEADER_ERROR_CODE,
    LANES_EXCHANGE,
    BudgetView,
    LaneMap,
    lane_queue_name,
    parse_reply,
)
from token_budget.worker.app import Worker
from token_budget.worker.broker.topology import (
    LEGACY_EXCHANGE_TYPE,
    TopologySpec,
    declare_topology,
    lane_arguments,
    routing_is_stable_on,
)
from token_budget.worker.settings import Settings
from token_budget.worker.store.audit import reconcile
from token_budget.worker.store.tables import processed_commands, routing_drains


async def _landed(amqp: Amqp, partitions: int, count: int) -> dict[str, int]:
    """routing key -> the lane it sits in, for ``count`` messages taken out of the lanes.

    Single-active-consumer quorum queues refuse basic.get: consume them instead.
    """
    found: dict[str, int] = {}

    def on_lane(index: int) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def take(message: AbstractIncomingMessage) -> None:
            assert message.routing_key is not None
            found[message.routing_key] = index

        return take

    channel = await amqp.connection.channel()
    try:
        for index in range(partitions):
            queue = await channel.get_queue(lane_queue_name(index), ensure=False)
            await queue.consume(on_lane(index), no_ack=True)
        await eventually(lambda: len(found) == count, within=30, what=f"{count} messages")
    finally:
        await channel.close()
    return found


@pytest.mark.parametrize(
    ("version", "stable"),
    [
        ("3.10.8", True),
        ("3.13.7", True),
        ("4.1.4", True),
        ("4.2.0", False),
        ("4.2.9", False),
        ("4.3.0", True),
        ("", True),
    ],
)
def test_only_rabbitmq_4_2_is_known_to_route_unstably(version: str, stable: bool) -> None:
    assert routing_is_stable_on(version) is stable


def test_the_lane_table_of_the_protocol_matches_the_lane_map() -> None:
    text = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    section = text.split("### 2.1 Lanes", 1)[1].split("**The lane guard.**", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \| `(budget\.lane\.\d{3})` \|$", section, re.MULTILINE)
    assert len(rows) >= 3
    lanes = LaneMap(16)
    assert {agent: lane_queue_name(lanes.index_of(agent)) for agent, _ in rows} == dict(rows)


async def test_the_broker_puts_every_agent_on_the_lane_the_lane_map_names(amqp_url: str) -> None:
    partitions = 16
    connection = await connect(amqp_url)
    try:
        await declare_topology(connection, TopologySpec(partitions, delivery_limit=20))
    finally:
        await connection.close()
    agents = [f"agent-{n:04d}" for n in range(400)]
    async with open_amqp(amqp_url) as amqp:
        await amqp.publish_all(Outgoing(command("get_budget", a), a) for a in agents)
        landed = await _landed(amqp, partitions, len(agents))

    lanes = LaneMap(partitions)
    assert landed == {agent: lanes.index_of(agent) for agent in agents}
    assert len(set(landed.values())) == partitions  # every lane has some


def _stranger(partitions: int) -> tuple[str, int]:
    """An agent named like a lane queue, with that lane not its own."""
    lanes = LaneMap(partitions)
    for index in range(partitions):
        name = lane_queue_name(index)
        if lanes.index_of(name) != index:
            return name, index
    raise AssertionError("every lane name hashes to itself")  # pragma: no cover


@pytest.mark.sqlite_only
async def test_a_command_published_straight_to_another_lane_is_dead_lettered_not_applied(
    worker: Worker, amqp_url: str, database_url: str
) -> None:
    # The default exchange routes by queue name: an agent named like the lane
    # makes routing key and agent_id agree, so only the lane guard can object.
    agent, wrong = _stranger(worker.topology.partitions)
    async with open_amqp(amqp_url) as amqp:
        await setup_agent(amqp, agent, 100)
        reply_to, replies = await amqp.reply_queue()
        stray = aio_pika.Message(
            command("consume", agent, 30),
            message_id="stray-1",
            reply_to=reply_to,
            correlation_id="stray",
            content_type="application/json",
        )
        await amqp.channel.default_exchange.publish(stray, routing_key=lane_queue_name(wrong))
        reply = parse_reply((await replies.reply("stray")).body)
        after, _ = await ask(amqp, Outgoing(command("get_budget", agent), agent))
        [dead] = await eventually(
            lambda: amqp.take_all(DEAD_LETTER_QUEUE), within=30, what="the dead letter"
        )

    assert not reply.ok and reply.error.code == "wrong_lane"
    assert f"belongs to lane {LaneMap(worker.topology.partitions).index_of(agent)}" in (
        reply.error.message
    )
    assert json.loads(after)["used_tokens"] == 0
    assert dead.headers[HEADER_ERROR_CODE] == "wrong_lane"
    assert dead.message_id == "stray-1"
    assert worker.lanes[wrong].misrouted == 1
    async with reader(database_url) as engine:
        assert await balances(engine) == {agent: (100, 0)}


@pytest.mark.sqlite_only
async def test_a_foreign_exchange_routing_an_agent_elsewhere_never_reorders_it(
    worker: Worker, amqp_url: str, database_url: str
) -> None:
    # A misbehaving exchange sends some of the agent's commands to another lane;
    # only those through budget.commands are applied, in their order.
    partitions = worker.topology.partitions
    agent = "agent-misrouted"
    wrong = (LaneMap(partitions).index_of(agent) + 1) % partitions
    async with open_amqp(amqp_url) as amqp:
        stray = await amqp.channel.declare_exchange("test.stray", "direct", auto_delete=True)
        lane = await amqp.channel.get_queue(lane_queue_name(wrong), ensure=False)
        await lane.bind(stray, routing_key=agent)
        await setup_agent(amqp, agent, 50)
        for n in range(10):
            body = command("consume", agent, 10)
            if n % 2:
                await stray.publish(aio_pika.Message(body, message_id=f"s-{n}"), routing_key=agent)
            else:
                await amqp.publish(Outgoing(body, agent, message_id=f"c-{n}"))
        after, _ = await ask(amqp, Outgoing(command("get_budget", agent), agent))
        dead = await eventually(
            lambda: amqp.take_all(DEAD_LETTER_QUEUE),
            within=30,
            what="the dead letters",
            done=lambda found: len(found) == 5,
        )
        await lane.unbind(stray, routing_key=agent)

    assert {m.message_id for m in dead} == {f"s-{n}" for n in range(1, 10, 2)}
    assert {m.headers[HEADER_ERROR_CODE] for m in dead} == {"wrong_lane"}
    assert json.loads(after)["used_tokens"] == 50
    async with reader(database_url) as engine:
        assert (await ledger_ids(engine))[agent] == [
            f"{agent}:allocate",
            *(f"c-{n}" for n in range(0, 10, 2)),
        ]


async def _declare_legacy(amqp_url: str, partitions: int, delivery_limit: int) -> None:
    """The topology of contract 1.1: a consistent-hash budget.commands, weight-1 lanes."""
    connection = await connect(amqp_url)
    try:
        channel = await connection.channel()
        commands = await channel.declare_exchange(
            COMMANDS_EXCHANGE, LEGACY_EXCHANGE_TYPE, durable=True
        )
        for index in range(partitions):
            queue = await channel.declare_queue(
                lane_queue_name(index), durable=True, arguments=lane_arguments(delivery_limit)
            )
            await queue.bind(commands, routing_key="1")
    finally:
        await connection.close()


@pytest.mark.slow
async def test_a_legacy_deployment_is_drained_in_order_then_switched(
    worker_settings: Settings, amqp_url: str, database_url: str, rabbit: RabbitAdmin, vhost: str
) -> None:
    settings = worker_settings.model_copy(update={"batch_max": 32, "prefetch": 64})
    await _declare_legacy(amqp_url, settings.partitions, settings.delivery_limit)
    # A backlog the legacy ring placed, waiting while no worker runs: small
    # allocations, so the outcome of each consume depends on the order.
    rounds, model = make_workload(60, 40, seed=9, prefix="legacy")
    async with open_amqp(amqp_url) as amqp:
        queue = await amqp.channel.declare_queue(
            "test.replies", durable=True, arguments={"x-queue-type": "quorum"}
        )
        for round_ in rounds:
            await amqp.publish_all(s.outgoing("test.replies") for s in round_)
        backlog = sum((await amqp.lane_backlog(settings.partitions)).values())
        # Two workers share the drain; each lane ends in a marker of its owner.
        first, second = Worker(settings), Worker(settings)
        async with running(first, second):
            await eventually(
                lambda: _exchange_type(rabbit, vhost),
                within=90,
                what="the switch",
                done=lambda kind: kind == "fanout",
            )
            finals = [(a, f"final-{a}") for a in model.allocated]
            await amqp.publish_all(
                Outgoing(command("get_budget", a), a, reply_to="test.replies", correlation_id=c)
                for a, c in finals
            )
            collected: list[aio_pika.abc.AbstractIncomingMessage] = []

            async def arrived() -> list[aio_pika.abc.AbstractIncomingMessage]:
                while (message := await queue.get(no_ack=True, fail=False)) is not None:
                    collected.append(message)
                return collected

            replies = await eventually(
                arrived,
                within=90,
                what="every reply",
                done=lambda found: len(found) >= len(model.seen) + len(finals),
            )
        upgrades = [w.upgrade for w in (first, second) if w.upgrade is not None]
        dead = await amqp.ready_count(DEAD_LETTER_QUEUE)

    assert backlog == sum(len(r) for r in rounds)
    assert upgrades and max([await u.drained_count() for u in upgrades]) == settings.partitions
    assert dead == 0
    answers = {m.correlation_id: json.loads(m.body) for m in replies}
    for query, (allocated, used) in model.seen.items():
        assert (answers[query]["allocated_tokens"], answers[query]["used_tokens"]) == (
            allocated,
            used,
        ), query
    for agent, correlation in finals:
        assert (answers[correlation]["allocated_tokens"], answers[correlation]["used_tokens"]) == (
            model.balances()[agent]
        )
    async with reader(database_url) as engine:
        assert await balances(engine) == model.balances()
        assert await ledger_ids(engine) == {a: ids for a, ids in model.applied.items() if ids}
        assert await reconcile(engine) == []


def _exchange_type(rabbit: RabbitAdmin, vhost: str) -> str:
    try:
        found = rabbit.call("GET", f"/exchanges/{quote(vhost, safe='')}/{COMMANDS_EXCHANGE}")
    except urllib.error.HTTPError as error:
        if error.code == 404:  # between the switch's delete and declare
            return "missing"
        raise
    kind = str(found["type"])
    if kind != "fanout":
        return kind
    # The switch declares the front exchange, then binds it to budget.lanes:
    # until the binding exists a publish to it reaches no lane.
    bindings = rabbit.call(
        "GET", f"/exchanges/{quote(vhost, safe='')}/{COMMANDS_EXCHANGE}/bindings/source"
    )
    return "fanout" if any(b["destination"] == LANES_EXCHANGE for b in bindings) else "unbound"


@pytest.mark.slow
async def test_a_worker_killed_while_draining_the_legacy_routing_is_succeeded_in_order(
    worker_process: Callable[..., WorkerProcess],
    amqp_url: str,
    database_url: str,
    rabbit: RabbitAdmin,
    vhost: str,
) -> None:
    await _declare_legacy(amqp_url, 4, 20)
    rounds, model = make_workload(60, 50, seed=10, queries=False, prefix="drainkill")
    async with open_amqp(amqp_url) as amqp:
        for round_ in rounds:
            await amqp.publish_all(s.outgoing() for s in round_)
        pool = {"lease_ttl": 1.5, "member_ttl": 1.5, "renew_interval": 0.3}
        # Small batches: the first worker is killed with most of the drain ahead.
        first = worker_process(batch_max=8, prefetch=16, **pool)
        await first.wait_ready()
        async with reader(database_url) as engine:
            await eventually(
                lambda: _processed(engine),
                within=60,
                what="draining under way",
                done=lambda n: n >= 300,
            )
            first.kill()
            assert await _processed(engine) < model.state_changing
            second = worker_process(**pool)
            await eventually(
                lambda: _exchange_type(rabbit, vhost),
                within=90,
                what="the switch",
                done=lambda kind: kind == "fanout",
            )
            await eventually(
                lambda: _processed(engine),
                within=60,
                what="everything applied",
                done=lambda n: n >= model.state_changing,
            )
            assert await balances(engine) == model.balances()
            assert await ledger_ids(engine) == {a: ids for a, ids in model.applied.items() if ids}
            assert await reconcile(engine) == []
        assert await amqp.ready_count(DEAD_LETTER_QUEUE) == 0
    events = [e["event"] for e in second.events()]
    assert events.count("lane_drained") == 4
    # The killed worker's markers were still queued: skipped, never taken for ours.
    assert "drain_marker_stale" in events
    assert "routing_switched" in events


async def _processed(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(
            (await conn.execute(select(func.count()).select_from(processed_commands))).scalar_one()
        )


@pytest.mark.sqlite_only
async def test_a_switch_cut_short_after_every_lane_drained_is_completed_by_the_next_worker(
    worker_settings: Settings,
    amqp_url: str,
    engine: AsyncEngine,
    rabbit: RabbitAdmin,
    vhost: str,
) -> None:
    # The state a crash leaves between recording the last drain and switching:
    # every lane drained, the legacy exchange still there.
    await _declare_legacy(amqp_url, worker_settings.partitions, worker_settings.delivery_limit)
    async with engine.begin() as conn:
        await conn.execute(
            insert(routing_drains),
            [
                {"partition": p, "worker_id": "gone", "drained_at": 0.0}
                for p in range(worker_settings.partitions)
            ],
        )
    async with (
        running(Worker(worker_settings)),
        BudgetClient.connect(amqp_url, timeout=20, name=connection_name()) as sdk,
    ):
        await eventually(
            lambda: _exchange_type(rabbit, vhost),
            within=30,
            what="the switch",
            done=lambda kind: kind == "fanout",
        )
        await sdk.register_agent("after-the-switch")
        assert await sdk.allocate("after-the-switch", 5) == BudgetView(
            agent_id="after-the-switch",
            allocated_tokens=5,
            used_tokens=0,
            reserved_tokens=0,
            available_tokens=5,
        )
