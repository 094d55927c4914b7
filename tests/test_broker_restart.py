"""Per-agent order and read-your-writes across restarts of the broker.

A RabbitMQ node of the tests' own (tests/private_services.py) is restarted,
gracefully (``stop_app``/``start_app``) and by SIGKILL of its Erlang VM, with
order-sensitive backlogs waiting in the lanes: small allocations, so which
consume is refused depends on the order. Every reply must equal an in-order
model, every ledger must list its agent's commands in published order, and
no agent may have been applied on any lane but its own.
"""

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.amqp_helpers import Outgoing, command, connect, open_amqp
from tests.db_helpers import assert_books_in_order_on_own_lanes, reader
from tests.eventually import eventually
from tests.private_services import PrivateRabbit
from tests.processes import WorkerProcess
from tests.support import unique
from tests.workload import Model, Step, make_workload
from token_budget.schemas import DEAD_LETTER_QUEUE, LaneMap, lane_queue_name
from token_budget.worker.broker.topology import TopologySpec, declare_topology
from token_budget.worker.store.tables import processed_commands

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PARTITIONS = 4
FAST = {
    "partitions": PARTITIONS,
    "heartbeat": 5,
    "retry_max_seconds": 0.5,
    "lease_ttl": 1.5,
    "member_ttl": 1.5,
    "renew_interval": 0.3,
}
REPLIES = "test.replies"


@pytest.fixture(scope="module")
def broker() -> Iterator[PrivateRabbit]:
    node = PrivateRabbit().start()
    yield node
    node.close()


@pytest.fixture
def broker_url(broker: PrivateRabbit) -> Iterator[str]:
    vhost = unique("restart")
    broker.ctl("add_vhost", vhost)
    broker.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"{broker.url}{vhost}"
    broker.ctl("delete_vhost", vhost)


@pytest.fixture
def start_worker(
    tmp_path: Path, broker_url: str, database_url: str
) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(**overrides: object) -> WorkerProcess:
        settings = {"amqp_url": broker_url, "database_url": database_url, **FAST, **overrides}
        process = WorkerProcess(tmp_path / f"worker-{len(started)}.log", **settings).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


async def _prepare(url: str) -> None:
    """The worker's topology and a durable reply queue that outlives restarts."""
    connection = await connect(url)
    try:
        await declare_topology(connection, TopologySpec(PARTITIONS, delivery_limit=20))
        channel = await connection.channel()
        # Quorum: it keeps even the non-persistent replies across a restart.
        # (Declared seconds before any crash: a quorum queue declared a moment
        # before a single node's crash may not be recovered, seen on 3.10.8.)
        await channel.declare_queue(REPLIES, durable=True, arguments={"x-queue-type": "quorum"})
    finally:
        await connection.close()


async def _publish(url: str, rounds: list[list[Step]]) -> None:
    # Round by round, each confirmed before the next: per-agent publish order.
    async with open_amqp(url) as amqp:
        for round_ in rounds:
            await amqp.publish_all(s.outgoing(REPLIES) for s in round_)


async def _publish_finals(url: str, model: Model) -> dict[str, str]:
    """One get_budget per agent; correlation id -> agent."""
    finals = {f"final-{agent}": agent for agent in model.allocated}
    async with open_amqp(url) as amqp:
        await amqp.publish_all(
            Outgoing(command("get_budget", a), a, reply_to=REPLIES, correlation_id=c)
            for c, a in finals.items()
        )
    return finals


async def _replies(url: str, expected: set[str], within: float) -> list[AbstractIncomingMessage]:
    """Every reply in the reply queue once those of ``expected`` have all come."""
    taken: list[AbstractIncomingMessage] = []
    connection = await connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(REPLIES, ensure=False)

        async def more() -> set[str]:
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                taken.append(message)
            return {m.correlation_id or "" for m in taken}

        await eventually(more, within=within, what="the replies", done=lambda ids: ids >= expected)
    finally:
        await connection.close()
    return taken


async def _state_changing(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return len((await conn.execute(select(processed_commands.c.message_id))).all())


async def _check(
    engine: AsyncEngine,
    model: Model,
    replies: list[AbstractIncomingMessage],
    finals: dict[str, str],
    *,
    exact: bool,
) -> None:
    answers: dict[str, list[tuple[int, int]]] = {}
    for message in replies:
        body = json.loads(message.body)
        seen = (body["allocated_tokens"], body["used_tokens"])
        answers.setdefault(message.correlation_id or "", []).append(seen)
    for correlation, agent in finals.items():
        # Published after the restart, behind everything else of the agent.
        assert answers[correlation] == [model.balances()[agent]], agent
    for query, states in answers.items():
        if query in finals:
            continue
        # Exact, or (after a redelivery) a later state of the agent, never an earlier one.
        allowed = [model.seen[query]] if exact else model.possible_answers(query)
        assert all(state in allowed for state in states), (query, states, allowed)
    await assert_books_in_order_on_own_lanes(engine, model, PARTITIONS)


@pytest.mark.parametrize("how", ["graceful", "kill"])
async def test_a_backlog_waiting_through_a_broker_restart_is_applied_in_order(
    broker: PrivateRabbit,
    broker_url: str,
    database_url: str,
    start_worker: Callable[..., WorkerProcess],
    how: str,
) -> None:
    rounds, model = make_workload(80, 40, seed=21, prefix="waiting")
    await _prepare(broker_url)
    first = start_worker()
    await first.wait_ready()  # it migrates the database
    first.stop()
    await _publish(broker_url, rounds[:25])
    await asyncio.to_thread(broker.restart, how)
    await _publish(broker_url, rounds[25:])
    finals = await _publish_finals(broker_url, model)
    start_worker()
    replies = await _replies(broker_url, set(model.seen) | set(finals), within=120)
    async with reader(database_url) as engine, open_amqp(broker_url) as amqp:
        await _check(engine, model, replies, finals, exact=True)
        assert await amqp.ready_count(DEAD_LETTER_QUEUE) == 0


@pytest.mark.parametrize("how", ["graceful", "kill"])
async def test_a_worker_running_through_a_broker_restart_keeps_order_and_read_your_writes(
    broker: PrivateRabbit,
    broker_url: str,
    database_url: str,
    start_worker: Callable[..., WorkerProcess],
    how: str,
) -> None:
    rounds, model = make_workload(80, 40, seed=22, prefix="running")
    await _prepare(broker_url)
    # Small batches: the backlog is still draining when the broker goes down.
    worker = start_worker(batch_max=8, prefetch=16)
    await worker.wait_ready()
    await _publish(broker_url, rounds[:25])
    async with reader(database_url) as engine:
        done = await eventually(
            lambda: _state_changing(engine),
            within=60,
            what="draining under way",
            done=lambda n: n >= 200,
        )
        assert done < model.state_changing
        await asyncio.to_thread(broker.restart, how)
        await worker.wait_for_event("broker_unavailable", 30)
        await _publish(broker_url, rounds[25:])
        finals = await _publish_finals(broker_url, model)
        replies = await _replies(broker_url, set(model.seen) | set(finals), within=120)
        await _check(engine, model, replies, finals, exact=False)
    async with open_amqp(broker_url) as amqp:
        assert await amqp.ready_count(DEAD_LETTER_QUEUE) == 0
    assert sum(e.get("event") == "worker_ready" for e in worker.events()) >= 2


async def _landing(url: str, exchange: str, queues: list[str], keys: list[str]) -> dict[str, str]:
    """Publish one message per key to ``exchange``; which queue each landed in."""
    found: dict[str, str] = {}
    connection = await connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange, ensure=False)
        await asyncio.gather(*(target.publish(aio_pika.Message(b"{}"), key) for key in keys))

        def into(name: str) -> Callable[[AbstractIncomingMessage], object]:
            async def take(message: AbstractIncomingMessage) -> None:
                found[message.routing_key or ""] = name

            return take

        for name in queues:
            queue = await channel.get_queue(name, ensure=False)
            await queue.consume(into(name), no_ack=True)
        await eventually(lambda: len(found) == len(keys), within=30, what="every key landed")
    finally:
        await connection.close()
    return found


@pytest.fixture
async def legacy_ring(broker_url: str) -> AsyncIterator[list[str]]:
    """16 quorum queues behind an x-consistent-hash exchange, as contract 1.1 ran."""
    names = [f"legacy.lane.{i:03d}" for i in range(16)]
    connection = await connect(broker_url)
    try:
        channel = await connection.channel()
        ring = await channel.declare_exchange("legacy.commands", "x-consistent-hash", durable=True)
        for name in names:
            queue = await channel.declare_queue(
                name, durable=True, arguments={"x-queue-type": "quorum"}
            )
            await queue.bind(ring, routing_key="1")
    finally:
        await connection.close()
    yield names


async def test_no_agent_changes_lane_across_broker_restarts(
    broker: PrivateRabbit, broker_url: str, legacy_ring: list[str]
) -> None:
    connection = await connect(broker_url)
    try:
        await declare_topology(connection, TopologySpec(16, delivery_limit=20))
    finally:
        await connection.close()
    lanes = [lane_queue_name(i) for i in range(16)]
    keys = [f"agent-{n:04d}" for n in range(400)]
    stable = [await _landing(broker_url, "budget.commands", lanes, keys)]
    legacy = [await _landing(broker_url, "legacy.commands", legacy_ring, keys)]
    for how in ("graceful", "kill"):
        await asyncio.to_thread(broker.restart, how)
        stable.append(await _landing(broker_url, "budget.commands", lanes, keys))
        legacy.append(await _landing(broker_url, "legacy.commands", legacy_ring, keys))

    def moved(runs: list[dict[str, str]]) -> list[int]:
        return [sum(a[k] != b[k] for k in keys) for a, b in itertools.pairwise(runs)]

    # The figures of the routing issue: printed (pytest -s), asserted only for ours.
    print(
        f"\nkeys of 400 moved per restart (graceful, kill): "
        f"x-consistent-hash {moved(legacy)}, budget.lanes {moved(stable)}"
    )
    lane_map = LaneMap(16)
    for landed in stable:
        assert landed == {k: lane_queue_name(lane_map.index_of(k)) for k in keys}
