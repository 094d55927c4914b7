"""Replies, events and dead letters, each awaited until the broker confirms it."""

from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    DeliveryMode,
)

from token_budget.schemas import (
    CONTENT_TYPE,
    DEAD_LETTER_EXCHANGE,
    EVENTS_EXCHANGE,
    HEADER_DUPLICATE,
    HEADER_ERROR,
    HEADER_ERROR_CODE,
    HEADER_LANE,
    Command,
    ErrorReply,
    RefusedEvent,
    refused_routing_key,
)
from token_budget.worker.broker.consumer import Delivery
from token_budget.worker.broker.wire_guard import clean_text

__all__ = ["DRAIN_MARKER", "Publisher"]

#: Header of the marker a lane puts behind the legacy routing's commands.
DRAIN_MARKER = "x-budget-drain-marker"


class Publisher:
    """One confirming channel per lane, so that lanes never wait on each other.

    Events and dead letters wait for the broker's confirm before the batch is
    acknowledged: once acknowledged, nothing else would keep them. Replies go
    out on the lane's own channel without a confirm: a lost reply costs the
    agent a retry with the same message_id, which the stored outcome answers,
    while waiting for a confirm would cost every RPC a round trip.
    """

    def __init__(
        self,
        channel: AbstractChannel,
        events: AbstractExchange,
        dead: AbstractExchange,
        replies: AbstractExchange,
    ) -> None:
        self.channel = channel
        self._confirmed_default = channel.default_exchange
        self._default = replies
        self._events = events
        self._dead = dead

    @classmethod
    async def open(cls, connection: AbstractConnection, lane: AbstractChannel) -> "Publisher":
        channel = await connection.channel(publisher_confirms=True)
        events = await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
        dead = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        return cls(channel, events, dead, lane.default_exchange)

    async def close(self) -> None:
        if not self.channel.is_closed:
            await self.channel.close()

    def reply(self, request: Delivery, body: bytes, *, duplicate: bool = False) -> Awaitable[Any]:
        """Answer ``request`` on its ``reply_to`` (direct reply-to or a queue)."""
        assert request.reply_to is not None
        message = aio_pika.Message(
            body,
            content_type=CONTENT_TYPE,
            correlation_id=clean_text(request.correlation_id or request.message_id),
            delivery_mode=DeliveryMode.NOT_PERSISTENT,
            headers={HEADER_DUPLICATE: True} if duplicate else None,
        )
        # Not mandatory: a requester that has gone away is not an error to hear about.
        return self._default.publish(message, routing_key=request.reply_to, mandatory=False)

    async def drain_marker(self, queue_name: str, marker: str) -> None:
        """Publish ``marker`` to the back of ``queue_name``, confirmed."""
        message = aio_pika.Message(
            b"{}",
            content_type=CONTENT_TYPE,
            headers={DRAIN_MARKER: marker},
            delivery_mode=DeliveryMode.PERSISTENT,
        )
        await self._confirmed_default.publish(message, routing_key=queue_name)

    def refused(
        self, command: Command, message_id: str | None, error: ErrorReply
    ) -> Awaitable[Any]:
        event = RefusedEvent(
            agent_id=command.key,
            command_type=command.command_type,
            message_id=message_id,
            tokens=getattr(command, "tokens", None),
            error=error.error,
            occurred_at=datetime.now(UTC),
        )
        message = aio_pika.Message(
            event.model_dump_json(exclude_none=True).encode(),
            content_type=CONTENT_TYPE,
            message_id=message_id,
            delivery_mode=DeliveryMode.PERSISTENT,
            type=event.event,
        )
        # Not mandatory: nobody may be listening to events, and that is fine.
        routing_key = refused_routing_key(error.error.code)
        return self._events.publish(message, routing_key=routing_key, mandatory=False)

    def dead_letter(
        self, request: Delivery, *, code: str, reason: str, lane: int
    ) -> Awaitable[Any]:
        """Keep the delivery as it came, with why it could not be applied."""
        # The original may hold text that was not UTF-8 (refused for that):
        # escape it, or the dead letter itself could not be sent.
        headers: dict[str, Any] = clean_text(dict(request.headers or {}))
        headers.update(
            {
                HEADER_ERROR_CODE: code,
                HEADER_ERROR: reason,
                HEADER_LANE: lane,
                "x-original-exchange": clean_text(request.exchange or ""),
                "x-original-routing-key": clean_text(request.routing_key or ""),
            }
        )
        message = aio_pika.Message(
            request.body,
            headers=headers,
            content_type=clean_text(request.content_type),
            content_encoding=clean_text(request.content_encoding),
            message_id=clean_text(request.message_id),
            correlation_id=clean_text(request.correlation_id),
            reply_to=clean_text(request.reply_to),
            timestamp=request.timestamp,
            type=clean_text(request.type),
            app_id=clean_text(request.app_id),
            user_id=None,
            delivery_mode=DeliveryMode.PERSISTENT,
        )
        return self._dead.publish(message, routing_key=clean_text(request.routing_key or ""))
