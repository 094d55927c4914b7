"""Publish commands and collect replies, events and dead letters with plain aio-pika.

Deliberately independent of ``client/``: these tests pin the worker's wire
behaviour, so they speak AMQP themselves.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)

from tests.eventually import eventually
from token_budget.schemas import (
    COMMANDS_EXCHANGE,
    CONTENT_TYPE,
    DIRECT_REPLY_TO,
    EVENTS_EXCHANGE,
    lane_queue_name,
    parse_reply,
)

__all__ = [
    "NO_MESSAGE_ID",
    "Amqp",
    "Collector",
    "Latin1",
    "Outgoing",
    "ask",
    "command",
    "connect",
    "connection_name",
    "open_amqp",
    "setup_agent",
]


#: The node id of the running test, set by conftest.py's autouse fixture.
TEST_ID: ContextVar[str] = ContextVar("TEST_ID", default="token-budget tests")


def connection_name() -> str:
    """The name a test's connections carry: its node id, so that a connection it
    leaks names it in the management UI (as aio-pika's own test suite does)."""
    return TEST_ID.get()


async def connect(url: str, **options: Any) -> AbstractConnection:
    """``aio_pika.connect``, the connection named after the running test."""
    connection: AbstractConnection = await aio_pika.connect(
        url, client_properties={"connection_name": connection_name()}, **options
    )
    return connection


class _Absent(str):
    """An empty string that is truthy.

    aiormq gives every message without a ``message_id`` a random one (so an
    aio-pika producer can never send none), while pamqp leaves an empty
    property off the wire. This value passes the first and is dropped by the
    second: the delivery really has no ``message_id``.
    """

    __slots__ = ()

    def __bool__(self) -> bool:
        return True


#: Pass as ``message_id`` to publish a message that carries none.
NO_MESSAGE_ID: Any = _Absent("")


class Latin1(str):
    """A header value that goes on the wire as a long string of Latin-1 bytes.

    pamqp encodes every ``str`` as UTF-8, but the protocol allows any bytes in a
    long string and other clients send them (Java's ``LongString`` from a
    ``byte[]``, for one); pamqp decodes such a value as ``bytes``.
    """

    __slots__ = ()

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return str.encode(self, "latin-1", errors)


def command(type_: str, agent_id: str, tokens: int | None = None) -> bytes:
    """A command body as an agent would send it."""
    body: dict[str, Any] = {"type": type_, "agent_id": agent_id}
    if tokens is not None:
        body["tokens"] = tokens
    return json.dumps(body).encode()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One publication to ``budget.commands``; routing key defaults to the agent."""

    body: bytes
    routing_key: str
    message_id: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    content_type: str | None = CONTENT_TYPE
    content_encoding: str | None = None
    headers: dict[str, Any] | None = None

    def message(self) -> aio_pika.Message:
        message = aio_pika.Message(
            self.body,
            headers=self.headers,
            message_id=self.message_id,
            reply_to=self.reply_to,
            correlation_id=self.correlation_id,
            content_type=self.content_type,
            content_encoding=self.content_encoding,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        if self.message_id is NO_MESSAGE_ID:
            # Message() turns it into a plain (falsy) str: put ours back.
            message.message_id = NO_MESSAGE_ID
        return message


#: Polling a list in memory costs nothing: look often, so that a test that
#: asks many questions in turn does not wait long for each answer.
_IN_MEMORY = 0.01


@dataclass
class Collector:
    """Everything that arrives on one queue, in arrival order."""

    messages: list[AbstractIncomingMessage] = field(default_factory=list)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)

    async def wait_count(self, count: int, within: float = 30.0) -> list[AbstractIncomingMessage]:
        """Every message so far, once at least ``count`` have arrived."""
        return await eventually(
            lambda: list(self.messages),
            within=within,
            what=f"{count} messages",
            done=lambda messages: len(messages) >= count,
            interval=_IN_MEMORY,
        )

    async def reply(self, correlation_id: str, within: float = 30.0) -> AbstractIncomingMessage:
        """The first message with ``correlation_id``, waiting for it if need be."""
        found = await eventually(
            lambda: next((m for m in self.messages if m.correlation_id == correlation_id), None),
            within=within,
            what=f"the reply {correlation_id!r}",
            interval=_IN_MEMORY,
        )
        assert found is not None
        return found

    def by_correlation(self) -> dict[str, list[AbstractIncomingMessage]]:
        grouped: dict[str, list[AbstractIncomingMessage]] = {}
        for message in self.messages:
            grouped.setdefault(message.correlation_id or "", []).append(message)
        return grouped


class Amqp:
    """A connection with a confirming channel that publishes commands."""

    def __init__(
        self, connection: AbstractConnection, channel: AbstractChannel, commands: AbstractExchange
    ) -> None:
        self.connection = connection
        self.channel = channel
        self._commands = commands
        self._direct: Collector | None = None

    async def publish(self, outgoing: Outgoing) -> None:
        """Publish and wait for the broker's confirm."""
        await self._commands.publish(outgoing.message(), routing_key=outgoing.routing_key)

    async def another_channel(self, *, confirms: bool = True) -> "Amqp":
        """Another channel on the same connection, for a concurrent publisher.

        Without confirms a publish returns once written: the channel still
        keeps the order, and a test that waits for the outcome loses nothing.
        """
        channel = await self.connection.channel(publisher_confirms=confirms)
        commands = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        return Amqp(self.connection, channel, commands)

    async def publish_all(self, items: Iterable[Outgoing], *, window: int = 200) -> int:
        """Publish in windows of concurrently awaited confirms (order not kept)."""
        pending: list[Any] = []
        count = 0
        for item in items:
            pending.append(self._commands.publish(item.message(), routing_key=item.routing_key))
            count += 1
            if len(pending) >= window:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        return count

    async def reply_queue(self) -> tuple[str, Collector]:
        """An exclusive, server-named queue consumed without acknowledgements."""
        collector = Collector()
        queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.consume(collector.on_message, no_ack=True)
        return queue.name, collector

    async def direct_reply_to(self) -> Collector:
        """Direct reply-to: consumed, no-ack, on the channel that publishes."""
        if self._direct is None:
            self._direct = Collector()
            queue = await self.channel.get_queue(DIRECT_REPLY_TO, ensure=False)
            await queue.consume(self._direct.on_message, no_ack=True)
        return self._direct

    async def bind_events(self, routing_key: str = "#") -> Collector:
        """A queue of our own bound to ``budget.events`` (declared by the worker)."""
        collector = Collector()
        events = await self.channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
        queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(events, routing_key=routing_key)
        await queue.consume(collector.on_message, no_ack=True)
        return collector

    async def ready_count(self, queue_name: str) -> int:
        """Messages ready in ``queue_name``, straight from the queue (no stats lag).

        Unacknowledged deliveries are not counted: ask when nobody consumes.
        """
        channel = await self.connection.channel()
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
            result = queue.declaration_result
            return int(result.message_count or 0)
        finally:
            await channel.close()

    async def lane_backlog(self, partitions: int) -> dict[str, int]:
        names = [lane_queue_name(index) for index in range(partitions)]
        return {name: await self.ready_count(name) for name in names}

    async def take_all(self, queue_name: str) -> list[AbstractIncomingMessage]:
        """Get every message now in ``queue_name``, acknowledging each."""
        channel = await self.connection.channel()
        try:
            queue = await channel.get_queue(queue_name, ensure=True)
            taken = []
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                await message.ack()
                taken.append(message)
            return taken
        finally:
            await channel.close()


@asynccontextmanager
async def open_amqp(amqp_url: str) -> AsyncIterator[Amqp]:
    connection = await connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        commands = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        yield Amqp(connection, channel, commands)
    finally:
        await connection.close()


async def setup_agent(amqp: Amqp, agent: str, tokens: int) -> None:
    """Register ``agent`` and allocate ``tokens``, waiting until both are applied."""
    reply_to, replies = await amqp.reply_queue()
    for kind, amount in (("register_agent", None), ("allocate", tokens)):
        await amqp.publish(
            Outgoing(
                command(kind, agent, amount), agent, message_id=f"{agent}:{kind}", reply_to=reply_to
            )
        )
    for message in await replies.wait_count(2):
        assert parse_reply(message.body).ok, message.body


async def ask(amqp: Amqp, outgoing: Outgoing) -> tuple[bytes, dict[str, object]]:
    """Publish with an exclusive reply queue; the reply's body and headers."""
    reply_to, replies = await amqp.reply_queue()
    await amqp.publish(
        Outgoing(
            outgoing.body,
            outgoing.routing_key,
            message_id=outgoing.message_id,
            reply_to=reply_to,
            correlation_id="ask",
        )
    )
    reply = await replies.reply("ask")
    return reply.body, dict(reply.headers or {})
