"""Deliveries straight from aiormq: no aio-pika message object, no task per delivery.

aio-pika wraps every delivery in an ``IncomingMessage`` and aiormq runs every
consumer callback as a task of its own: together about half the CPU a
do-nothing consumer spends per delivery (docs/performance.md). A lane needs
neither: it reads a few properties, and
acknowledges a whole batch at once on its channel. So a lane consumes on the
aiormq channel under its aio-pika channel, and its deliveries go straight
into the lane's inbox as ``Delivery`` objects.

The fast path reads each delivery's frames in aiormq's channel reader and
hands it over without a task; it relies on two private aiormq methods and is
used only where they exist, else the public ``basic_consume`` callback is
(``FAST_PATH`` says which). Either way deliveries arrive in delivery-tag
order, one at a time.
"""

from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

__all__ = ["FAST_PATH", "Delivery", "consume"]

#: aiormq's channel reader awaits ``_on_deliver_frame(frame)`` per delivery.
_HOOKS = ("_on_deliver_frame", "_read_content", "_Channel__get_content_header")
FAST_PATH = all(hasattr(aiormq.Channel, name) for name in _HOOKS)


class Delivery:
    """One delivery: its body, routing and the properties a lane reads."""

    __slots__ = ("_properties", "body", "delivery_tag", "exchange", "routing_key")

    def __init__(self, message: DeliveredMessage) -> None:
        frame: Any = message.delivery
        self.body: bytes = message.body
        self.delivery_tag: int = frame.delivery_tag
        self.routing_key: str | None = frame.routing_key
        self.exchange: str | None = frame.exchange
        self._properties = message.header.properties

    @property
    def message_id(self) -> str | None:
        return self._properties.message_id

    @property
    def correlation_id(self) -> str | None:
        return self._properties.correlation_id

    @property
    def reply_to(self) -> str | None:
        return self._properties.reply_to

    @property
    def content_type(self) -> str | None:
        return self._properties.content_type

    @property
    def content_encoding(self) -> str | None:
        return self._properties.content_encoding

    @property
    def headers(self) -> dict[str, Any] | None:
        return self._properties.headers

    @property
    def user_id(self) -> str | None:
        return self._properties.user_id

    @property
    def app_id(self) -> str | None:
        return self._properties.app_id

    @property
    def type(self) -> str | None:
        return self._properties.message_type

    @property
    def timestamp(self) -> datetime | None:
        return self._properties.timestamp


async def consume(
    channel: aiormq.abc.AbstractChannel, queue: str, deliver: Callable[[Delivery], None]
) -> None:
    """Consume ``queue`` on ``channel`` (unacknowledged), calling ``deliver`` per delivery."""
    if FAST_PATH and isinstance(channel, aiormq.Channel):
        _hand_over(channel, deliver)

    async def callback(message: DeliveredMessage) -> None:
        deliver(Delivery(message))

    await channel.basic_consume(queue, callback, no_ack=False)


def _hand_over(channel: aiormq.Channel, deliver: Callable[[Delivery], None]) -> None:
    # The channel carries only this consumer, so every delivery frame is ours.
    read_header = channel._Channel__get_content_header  # type: ignore[attr-defined]
    read_content = channel._read_content

    async def on_deliver_frame(frame: Any) -> None:
        header = await read_header()
        deliver(Delivery(await read_content(frame, header)))

    channel._on_deliver_frame = on_deliver_frame  # type: ignore[method-assign]
