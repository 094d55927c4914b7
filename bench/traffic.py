"""Commands on the wire: the backlog publisher and a direct reply-to RPC client.

Everything is published exactly as an agent would: JSON to ``budget.commands``
with the agent as routing key, a message_id, persistent, with confirms awaited
in windows (one confirm at a time would make the publisher the bottleneck).
"""

import asyncio
import json
import math
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, DeliveryMode

from token_budget.schemas import COMMANDS_EXCHANGE, CONTENT_TYPE, DIRECT_REPLY_TO, QUERIES_QUEUE
from token_budget.worker.broker.topology import TopologySpec, declare_topology

from .echo import ECHO_EXCHANGE

__all__ = [
    "ALLOCATION",
    "MIN_SAMPLES_P99",
    "RpcClient",
    "Wire",
    "agent_names",
    "consume_commands",
    "declare",
    "group_commands",
    "latency_summary",
    "publish",
    "setup_commands",
]

#: Tokens each agent is given: far more than the drains consume, so every
#: consume is applied and none is refused.
ALLOCATION = 10**12

#: (routing key, body, message_id)
Wire = tuple[str, bytes, str]


def agent_names(count: int, prefix: str = "agent") -> list[str]:
    return [f"bench-{prefix}-{index:05d}" for index in range(count)]


def _body(**fields: Any) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def setup_commands(agents: list[str]) -> Iterator[Wire]:
    """register_agent then allocate for every agent (same lane, so in order)."""
    for agent in agents:
        yield agent, _body(type="register_agent", agent_id=agent), f"reg-{agent}"
        yield (
            agent,
            _body(type="allocate", agent_id=agent, tokens=ALLOCATION),
            f"alloc-{agent}",
        )


def group_commands(group_id: str, parent_id: str | None = None) -> list[Wire]:
    """register_group then allocate ``ALLOCATION`` (one routing key, so in order)."""
    fields: dict[str, Any] = {"type": "register_group", "group_id": group_id}
    if parent_id is not None:
        fields["parent_id"] = parent_id
    allocate = _body(type="allocate", group_id=group_id, tokens=ALLOCATION)
    return [
        (group_id, _body(**fields), f"reg-{group_id}"),
        (group_id, allocate, f"alloc-{group_id}"),
    ]


def consume_commands(agents: list[str], count: int, tag: str) -> Iterator[Wire]:
    """``count`` consumes of one token, round-robin over ``agents``."""
    for index in range(count):
        agent = agents[index % len(agents)]
        yield agent, _body(type="consume", agent_id=agent, tokens=1), f"{tag}-{index}"


async def declare(amqp_url: str, partitions: int, delivery_limit: int) -> list[str]:
    """The worker's own topology (same exchange, same quorum lanes), declared by its code."""
    connection = await aio_pika.connect(amqp_url)
    try:
        topology = await declare_topology(connection, TopologySpec(partitions, delivery_limit))
        return list(topology.lanes)
    finally:
        await connection.close()


async def publish(amqp_url: str, commands: Iterable[Wire], *, window: int = 1000) -> float:
    """Publish with confirms; return the rate in messages per second."""
    connection = await aio_pika.connect(amqp_url)
    started = time.perf_counter()
    count = 0
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        pending = []
        for routing_key, body, message_id in commands:
            message = aio_pika.Message(
                body,
                content_type=CONTENT_TYPE,
                message_id=message_id,
                delivery_mode=DeliveryMode.PERSISTENT,
            )
            pending.append(exchange.publish(message, routing_key=routing_key))
            count += 1
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await connection.close()
    return count / max(time.perf_counter() - started, 1e-9)


class RpcClient:
    """Requests over direct reply-to: consume ``amq.rabbitmq.reply-to`` without
    acknowledgements on the channel that publishes, match by correlation_id."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection) -> None:
        self._connection = connection
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._channel: aio_pika.abc.AbstractChannel | None = None

    @classmethod
    async def open(cls, amqp_url: str) -> "RpcClient":
        client = cls(await aio_pika.connect(amqp_url))
        channel = await client._connection.channel(publisher_confirms=False)
        replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await replies.consume(client._on_reply, no_ack=True)
        client._channel = channel
        return client

    async def close(self) -> None:
        await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._waiting.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    async def call(
        self, exchange: str, routing_key: str, body: bytes, *, within: float = 120.0
    ) -> tuple[float, bytes]:
        """One request; return (latency in seconds, reply body)."""
        assert self._channel is not None
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        target = (
            self._channel.default_exchange
            if exchange == ""
            else await self._channel.get_exchange(exchange, ensure=False)
        )
        message = aio_pika.Message(
            body,
            content_type=CONTENT_TYPE,
            message_id=correlation_id,
            correlation_id=correlation_id,
            reply_to=DIRECT_REPLY_TO,
            delivery_mode=DeliveryMode.NOT_PERSISTENT,
        )
        started = time.perf_counter()
        try:
            await target.publish(message, routing_key=routing_key)
            reply = await asyncio.wait_for(future, within)
        finally:
            self._waiting.pop(correlation_id, None)
        return time.perf_counter() - started, reply

    async def get_budget(self, agent: str, *, within: float = 120.0) -> float:
        """Latency of one get_budget answered by the worker; fails on an error reply."""
        latency, reply = await self.call(
            COMMANDS_EXCHANGE, agent, _body(type="get_budget", agent_id=agent), within=within
        )
        if not json.loads(reply).get("ok", False):
            raise RuntimeError(f"get_budget({agent}) failed: {reply[:300]!r}")
        return latency

    async def get_budget_committed(self, agent: str, *, within: float = 120.0) -> float:
        """Latency of one committed get_budget on budget.queries (not behind the lane)."""
        body = _body(type="get_budget", agent_id=agent, consistency="committed")
        latency, reply = await self.call("", QUERIES_QUEUE, body, within=within)
        if not json.loads(reply).get("ok", False):
            raise RuntimeError(f"committed get_budget({agent}) failed: {reply[:300]!r}")
        return latency

    async def echo(self, agent: str, *, within: float = 120.0) -> float:
        """Latency of one request to the echo server, routed like a get_budget."""
        latency, _ = await self.call(
            ECHO_EXCHANGE, agent, _body(type="get_budget", agent_id=agent), within=within
        )
        return latency


def _percentile(ordered: list[float], fraction: float) -> float:
    # Linear interpolation between closest ranks (numpy's default).
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


#: Fewer samples than this make "p99" the maximum of a handful: not reported.
MIN_SAMPLES_P99 = 300


def latency_summary(samples: list[float]) -> dict[str, Any]:
    """p50/p99/max in milliseconds over ``samples`` (seconds); p99 needs 300."""
    if not samples:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(samples)
    p99 = _percentile(ordered, 0.99) if len(ordered) >= MIN_SAMPLES_P99 else None
    return {
        "n": len(ordered),
        "p50_ms": round(_percentile(ordered, 0.50) * 1000, 3),
        "p99_ms": None if p99 is None else round(p99 * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
    }
