"""A three-node RabbitMQ cluster whose nodes restart one at a time under load.

The cluster is the test's own (tests/private_services.py): quorum lanes with
a replica on every node, two workers connected to different nodes, and a
publisher that moves to another node when its own goes down, republishing
whatever was not confirmed (same message_id: a copy is a duplicate, never a
second effect). Restarts are graceful and by SIGKILL of a node's VM. No agent
may change lane, order and read-your-writes must hold, and every command
must be applied exactly once.
"""

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.amqp_helpers import Outgoing, command, connect
from tests.db_helpers import assert_books_in_order_on_own_lanes, reader
from tests.eventually import eventually
from tests.private_services import PrivateCluster
from tests.processes import WorkerProcess
from tests.support import unique
from tests.workload import Model, make_workload
from token_budget.client.connection import is_open
from token_budget.schemas import COMMANDS_EXCHANGE, DEAD_LETTER_QUEUE, LaneMap

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PARTITIONS = 4
REPLIES = "test.replies"
FAST = {
    "partitions": PARTITIONS,
    "heartbeat": 5,
    "retry_max_seconds": 0.5,
    "lease_ttl": 3,
    "member_ttl": 3,
    "renew_interval": 0.5,
}
#: After which round each node restarts, and how.
RESTARTS = {6: (0, "graceful"), 14: (1, "kill"), 22: (2, "graceful")}
_LOST = (
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPError,
    aio_pika.exceptions.AMQPError,
    RuntimeError,
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[PrivateCluster]:
    nodes = PrivateCluster(3).start()
    yield nodes
    nodes.close()


@pytest.fixture
def vhost_urls(cluster: PrivateCluster) -> Iterator[list[str]]:
    vhost = unique("cluster")
    cluster.nodes[0].ctl("add_vhost", vhost)
    cluster.nodes[0].ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield [f"{url}{vhost}" for url in cluster.urls]
    cluster.nodes[0].ctl("delete_vhost", vhost)


class FailoverAmqp:
    """A connection to any node that answers; on loss, to the next one."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self._next = 0
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self.failovers = 0

    async def channel(self) -> aio_pika.abc.AbstractChannel:
        while True:
            if self._connection is not None and not is_open(self._connection):
                self.failovers += 1
                self._connection = None
            if self._connection is None:
                url = self.urls[self._next % len(self.urls)]
                self._next += 1
                try:
                    self._connection = await connect(url, timeout=5)
                except _LOST:
                    await asyncio.sleep(0.2)
                    continue
            try:
                return await self._connection.channel(publisher_confirms=True)
            except _LOST:
                self.failovers += 1
                self._connection = None

    async def publish_round(self, items: list[Outgoing]) -> None:
        """Until every item is confirmed; a lost connection republishes the round."""
        while True:
            channel = await self.channel()
            try:
                exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
                await asyncio.gather(
                    *(exchange.publish(i.message(), routing_key=i.routing_key) for i in items)
                )
                await channel.close()
                return
            except _LOST:
                self.failovers += 1
                self._connection = None
                await asyncio.sleep(0.2)

    async def take_replies(self, into: list[AbstractIncomingMessage]) -> None:
        channel = await self.channel()
        try:
            queue = await channel.get_queue(REPLIES, ensure=False)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                into.append(message)
        except _LOST:
            self._connection = None
        finally:
            if not channel.is_closed:
                await channel.close()

    async def close(self) -> None:
        if self._connection is not None and not self._connection.is_closed:
            await self._connection.close()


async def test_nodes_restarting_in_turn_under_load_keep_every_agent_on_its_lane_in_order(
    cluster: PrivateCluster, vhost_urls: list[str], database_url: str, tmp_path: Path
) -> None:
    rounds, model = make_workload(120, 30, seed=31, prefix="clustered")
    workers = [
        WorkerProcess(
            tmp_path / f"worker-{i}.log",
            amqp_url=vhost_urls[i + 1],
            database_url=database_url,
            **FAST,
        ).start()
        for i in range(2)
    ]
    amqp = FailoverAmqp(vhost_urls)
    try:
        for process in workers:
            await process.wait_ready(90)
        channel = await amqp.channel()
        await channel.declare_queue(REPLIES, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.close()
        restarting: list[asyncio.Task[None]] = []
        for index, round_ in enumerate(rounds):
            await amqp.publish_round([s.outgoing(REPLIES) for s in round_])
            if index in RESTARTS:
                # Under load: the next rounds are published while the node restarts.
                node, how = RESTARTS[index]
                if restarting:
                    await restarting[-1]
                restarting.append(
                    asyncio.create_task(asyncio.to_thread(cluster.nodes[node].restart, how))
                )
        await asyncio.gather(*restarting)
        finals = {f"final-{a}": a for a in model.allocated}
        await amqp.publish_round(
            [
                Outgoing(command("get_budget", a), a, reply_to=REPLIES, correlation_id=c)
                for c, a in finals.items()
            ]
        )
        replies: list[AbstractIncomingMessage] = []

        async def unanswered() -> set[str]:
            await amqp.take_replies(replies)
            return set(finals) - {m.correlation_id or "" for m in replies}

        # Replies are published unconfirmed (protocol §1): one in flight when
        # a node goes down may be lost. Those to the queries published after
        # the restarts must all come.
        await eventually(
            unanswered,
            within=180,
            what="the replies to the last queries",
            interval=0.5,
            done=lambda missing: not missing,
        )
        await amqp.take_replies(replies)
        # Each worker lost its node once and came back by itself.
        await eventually(
            lambda: all(_ready_count(p) >= 2 for p in workers),
            within=60,
            what="both workers reconnected",
        )
        channel = await amqp.channel()
        dead = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        dead_letters = dead.declaration_result.message_count
        await channel.close()
    finally:
        await amqp.close()
        for process in workers:
            process.stop()

    assert amqp.failovers >= 1, "the publisher's node restarted while it published"
    assert dead_letters == 0
    _check_replies(model, replies, finals)
    async with reader(database_url) as engine:
        # Exactly once, in published order, whatever was republished.
        await assert_books_in_order_on_own_lanes(engine, model, PARTITIONS)


def _ready_count(process: WorkerProcess) -> int:
    return sum(e.get("event") == "worker_ready" for e in process.events())


def _check_replies(
    model: Model, replies: list[AbstractIncomingMessage], finals: dict[str, str]
) -> None:
    answers: dict[str, list[tuple[int, int]]] = {}
    for message in replies:
        body = json.loads(message.body)
        answers.setdefault(message.correlation_id or "", []).append(
            (body["allocated_tokens"], body["used_tokens"])
        )
    for correlation, agent in finals.items():
        assert set(answers[correlation]) == {model.balances()[agent]}, agent
    for query in model.seen:
        assert all(s in model.possible_answers(query) for s in answers.get(query, [])), query
    lost = set(model.seen) - set(answers)
    print(f"\ncluster: {len(model.seen) - len(lost)} of {len(model.seen)} earlier queries answered")
    assert len(lost) < len(model.seen) / 2


def test_the_workload_is_spread_over_every_lane() -> None:
    # The cluster test means something only if every lane carries agents.
    lanes = LaneMap(PARTITIONS)
    assert {lanes.index_of(f"clustered-{n:04d}") for n in range(120)} == set(range(PARTITIONS))
