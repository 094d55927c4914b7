"""BudgetClient: the agents' SDK over RabbitMQ.

Every command is published with publisher confirms and ``mandatory=True``, so
it is either confirmed by the broker or raises: never lost in silence. RPCs
wait for the worker's reply on direct reply-to (default) or on an exclusive
reply queue of this connection.

Connection: a plain ``aio_pika.connect``, not ``connect_robust``, on purpose.
Direct reply-to binds replies to the channel that published the request, so a
request in flight when its channel or connection dies can never be answered;
connect_robust would reopen the channel behind our back and leave those callers
waiting for their timeout, and it has known gaps restoring consumers (aio-pika
#231, #626, #334). Instead this client fails the requests in flight at once
(``ReplyLost``), and reopens the channel, or reconnects, on the next call. The
same path recovers the channel the broker closes when a command is published
to an exchange that does not exist.
"""

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    DeliveryMode,
)
from pydantic import ValidationError

from token_budget.schemas import (
    COMMANDS_EXCHANGE,
    CONTENT_TYPE,
    DIRECT_REPLY_TO,
    MESSAGE_ID_MAX_LENGTH,
    QUERIES_QUEUE,
    Allocate,
    BudgetView,
    Command,
    Consistency,
    Consume,
    GetAvailable,
    GetBudget,
    OkReply,
    RegisterAgent,
    is_committed_query,
)

from .connection import CONNECTION_ERRORS, Connecting, is_open
from .errors import (
    BrokerUnavailable,
    BudgetClientError,
    InvalidReply,
    NotDelivered,
    ReplyLost,
    refusal_from_wire,
)
from .groups import GroupCommands
from .probe import lane_consumers, timeout_error
from .reservations import ReservationCommands
from .usage import usage_from

__all__ = ["BudgetClient", "ReplyQueue", "new_message_id"]

ReplyQueue = Literal["direct", "exclusive"]

_log = logging.getLogger(__name__)


def new_message_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class _Pending:
    """An RPC waiting for its reply, and what its reply must come through."""

    future: "asyncio.Future[OkReply]"
    channel: AbstractChannel
    connection: AbstractConnection


class BudgetClient(ReservationCommands, GroupCommands):
    """One connection; safe for many concurrent calls from one event loop.

    Use ``client = await BudgetClient.connect(url)`` and ``await client.close()``,
    or ``async with BudgetClient.connect(url) as client: ...``.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        reply_queue: ReplyQueue = "direct",
        name: str | None = None,
        user_id: str | None = None,
    ) -> None:
        if reply_queue not in ("direct", "exclusive"):
            raise ValueError(f"reply_queue must be 'direct' or 'exclusive', not {reply_queue!r}")
        self.timeout = timeout
        self.reply_queue: ReplyQueue = reply_queue
        self._url = url
        self._name = name or f"budget-client {socket.gethostname()}:{os.getpid()}"
        #: Sent as the AMQP ``user_id`` of every command. Required by a worker
        #: with BUDGET_AUTH=user-id; must be the user of ``url``, or the broker
        #: refuses the publish (NotDelivered).
        self.user_id = user_id
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._reply_channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._reply_to = ""
        self._reply_queue_owner: AbstractConnection | None = None
        self._pending: dict[str, _Pending] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        timeout: float = 5.0,
        reply_queue: ReplyQueue = "direct",
        name: str | None = None,
        user_id: str | None = None,
    ) -> "Connecting[BudgetClient]":
        """Awaitable (returns the connected client) and an async context manager."""
        return Connecting(
            cls(url, timeout=timeout, reply_queue=reply_queue, name=name, user_id=user_id)
        )

    async def __aenter__(self) -> "BudgetClient":
        await self._ready()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def pending_requests(self) -> int:
        """RPCs waiting for a reply (abandoned ones are removed)."""
        return len(self._pending)

    async def close(self) -> None:
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            await connection.close()
        self._fail_pending("the client was closed", lambda _: True)

    # -- commands -----------------------------------------------------------

    async def register_agent(
        self, agent_id: str, *, group_id: str | None = None, message_id: str | None = None
    ) -> BudgetView:
        """Register the agent, in ``group_id`` if given (``register_group``)."""
        command = RegisterAgent(type="register_agent", agent_id=agent_id, group_id=group_id)
        return (await self.request(command, message_id=message_id)).view()

    async def allocate(
        self, agent_id: str, tokens: int, *, message_id: str | None = None
    ) -> BudgetView:
        command = Allocate(type="allocate", agent_id=agent_id, tokens=tokens)
        return (await self.request(command, message_id=message_id)).view()

    async def consume(self, agent_id: str, tokens: int, *, message_id: str | None = None) -> str:
        """Fire-and-forget: return the message_id once the broker confirmed it.

        A refusal is published as a ``budget.refused.<code>`` event, not raised.
        """
        command = Consume(type="consume", agent_id=agent_id, tokens=tokens)
        message_id = _checked_message_id(message_id)
        try:
            async with asyncio.timeout(self.timeout):
                await self._publish(command, message_id)
        except TimeoutError:
            raise NotDelivered(
                f"the broker did not confirm {message_id} within {self.timeout}s"
            ) from None
        return message_id

    async def consume_usage(
        self, agent_id: str, response: object, *, message_id: str | None = None
    ) -> str | None:
        """``consume`` what an LLM response says it used (``usage_from``): prompt
        plus completion tokens. Raises ``UsageMissing`` before publishing anything
        if the response carries no usage, rather than charge 0. A usage of 0
        tokens has nothing to charge: None, and nothing is published."""
        tokens = usage_from(response).tokens
        if tokens == 0:
            return None
        return await self.consume(agent_id, tokens, message_id=message_id)

    async def consume_and_wait(
        self, agent_id: str, tokens: int, *, message_id: str | None = None
    ) -> BudgetView:
        command = Consume(type="consume", agent_id=agent_id, tokens=tokens)
        return (await self.request(command, message_id=message_id)).view()

    async def get_budget(
        self, agent_id: str, *, consistency: Consistency | None = None
    ) -> BudgetView:
        """The agent's budget. By default after every command published before
        (on its lane); ``Consistency.COMMITTED``: at once, as last committed,
        from ``budget.queries`` (the view says so, and ``as_of``)."""
        command = GetBudget(type="get_budget", agent_id=agent_id, consistency=consistency)
        return (await self.request(command)).view()

    async def get_available(self, agent_id: str, *, consistency: Consistency | None = None) -> int:
        command = GetAvailable(type="get_available", agent_id=agent_id, consistency=consistency)
        reply = await self.request(command)
        if reply.available_tokens is None:
            raise InvalidReply(f"get_available for {agent_id!r} answered without an amount")
        return reply.available_tokens

    async def request(
        self,
        command: Command,
        *,
        message_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - part of the SDK's contract
    ) -> OkReply:
        """Publish ``command`` and wait for its reply; raise the typed error of a refusal.

        State-changing commands get a new message_id unless one is given; pass
        the same one again to retry safely after a ``RequestTimeout``.
        """
        if command.changes_state or message_id is not None:
            message_id = _checked_message_id(message_id)
        limit = self.timeout if timeout is None else timeout
        # A correlation id of its own per request, so that two requests
        # retrying the same message_id at once each get their reply.
        correlation_id = new_message_id()
        try:
            async with asyncio.timeout(limit):
                await self._ready()
                assert self._reply_channel is not None and self._connection is not None
                future: asyncio.Future[OkReply] = asyncio.get_running_loop().create_future()
                self._pending[correlation_id] = _Pending(
                    future, self._reply_channel, self._connection
                )
                await self._publish(command, message_id, correlation_id=correlation_id)
                return await future
        except TimeoutError:
            raise await timeout_error(self._connection, command, message_id, limit) from None
        finally:
            self._forget(correlation_id)

    async def lane_consumers(self) -> int:
        """Workers consuming the first lane: 0 means no request will be answered now."""
        await self._ready()
        assert self._connection is not None
        return await lane_consumers(self._connection)

    # -- broker plumbing ----------------------------------------------------

    async def _publish(
        self, command: Command, message_id: str | None, *, correlation_id: str | None = None
    ) -> None:
        await self._ready()
        assert self._exchange is not None and self._channel is not None
        exchange, routing_key = self._exchange, command.key
        if is_committed_query(command):
            exchange, routing_key = self._channel.default_exchange, QUERIES_QUEUE
        message = aio_pika.Message(
            # Defaults left out: a worker of an older contract knows no new field.
            command.model_dump_json(exclude_defaults=True).encode(),
            content_type=CONTENT_TYPE,
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=self._reply_to if correlation_id is not None else None,
            user_id=self.user_id,
        )
        what = f"{command.command_type.value} for {command.key!r} (message_id {message_id})"
        try:
            await exchange.publish(message, routing_key=routing_key, mandatory=True)
        except aiormq.exceptions.PublishError:
            if routing_key == QUERIES_QUEUE:
                raise NotDelivered(
                    f"{what} was returned unroutable: there is no queue {QUERIES_QUEUE!r}; "
                    "start a worker of this version (1.3 or later) on this vhost"
                ) from None
            raise NotDelivered(
                f"{what} was returned unroutable: no lane queue is bound to "
                f"{COMMANDS_EXCHANGE!r}; is the worker deployed on this vhost?"
            ) from None
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise NotDelivered(
                f"{what} was not delivered: exchange {COMMANDS_EXCHANGE!r} does not exist "
                "on this vhost; no worker has ever started here"
            ) from None
        except aiormq.exceptions.DeliveryError as error:
            raise NotDelivered(f"the broker refused {what}: {error}") from error
        except CONNECTION_ERRORS as error:
            raise NotDelivered(f"the broker did not confirm {what}: {error!r}") from error

    async def _ready(self) -> None:
        """Connect, and (re)open the channels, if they are not open."""
        if self._closed:
            raise BudgetClientError("the client is closed", code="closed")
        if self._usable():
            return
        async with self._lock:
            if self._usable():
                return
            if not is_open(self._connection):
                dead, self._connection = self._connection, None
                if dead is not None:
                    with contextlib.suppress(Exception):
                        await dead.close()
                self._connection = await self._open_connection()
            connection = self._connection
            assert connection is not None  # opened just above, or found open
            try:
                await self._open_channels(connection)
            except CONNECTION_ERRORS as error:
                # The connection died under us (a broker restart): start
                # afresh on the next call rather than reuse its corpse.
                self._connection = None
                raise BrokerUnavailable(f"cannot open a channel: {error!r}") from error

    def _usable(self) -> bool:
        return is_open(self._connection) and not any(
            part is None or part.is_closed for part in (self._channel, self._reply_channel)
        )

    async def _open_connection(self) -> AbstractConnection:
        try:
            connection = await aio_pika.connect(
                self._url, timeout=self.timeout, client_properties={"connection_name": self._name}
            )
        except CONNECTION_ERRORS as error:
            raise BrokerUnavailable(f"cannot connect to the broker: {error!r}") from error
        connection.close_callbacks.add(
            lambda *_: self._fail_pending(
                "the connection to the broker closed", lambda p: p.connection is connection
            )
        )
        return connection

    async def _open_channels(self, connection: AbstractConnection) -> None:
        channel = self._channel
        if channel is None or channel.is_closed:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            self._exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        if self.reply_queue == "direct":
            # Direct reply-to: consumed no-ack on the very channel that publishes.
            reply_channel = channel
            await self._consume_replies(channel, channel.get_queue(DIRECT_REPLY_TO, ensure=False))
        elif self._reply_channel is None or self._reply_channel.is_closed:
            # Its own channel, so that a publish the broker refuses (which
            # closes the publishing channel) leaves the replies in flight alone.
            # Exclusive, not auto-delete: it lives as long as the connection.
            reply_channel = await connection.channel(publisher_confirms=False)
            if self._reply_queue_owner is connection:
                # Still there: "amq.gen-" names may not be declared again.
                declaring = reply_channel.get_queue(self._reply_to, ensure=False)
            else:
                declaring = reply_channel.declare_queue("", exclusive=True)
            await self._consume_replies(reply_channel, declaring)
            self._reply_queue_owner = connection
        else:
            reply_channel = self._reply_channel
        self._channel, self._reply_channel = channel, reply_channel

    async def _consume_replies(
        self, channel: AbstractChannel, declaring: Awaitable[AbstractQueue]
    ) -> None:
        queue = await declaring
        await queue.consume(self._on_reply, no_ack=True)
        self._reply_to = queue.name
        channel.close_callbacks.add(
            lambda *_: self._fail_pending(
                "the channel carrying replies closed", lambda p: p.channel is channel
            )
        )

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        pending = self._pending.get(message.correlation_id or "")
        future = pending.future if pending is not None else None
        if future is None or future.done():
            # The caller gave up (timeout, cancellation) or the reply is foreign.
            _log.debug("reply dropped: no request waits for %r", message.correlation_id)
            return
        try:
            data = json.loads(message.body)
            if isinstance(data, dict) and data.get("ok") is False:
                future.set_exception(refusal_from_wire(data.get("error")))
            else:
                # Fields newer than this client are ignored: adding one never breaks it.
                future.set_result(OkReply.model_validate(_known(data)))
        except (ValueError, ValidationError, BudgetClientError) as error:
            future.set_exception(InvalidReply(f"unreadable reply: {error}"[:1000]))

    def _fail_pending(self, why: str, which: Callable[[_Pending], bool]) -> None:
        for pending in self._pending.values():
            if which(pending) and not pending.future.done():
                pending.future.set_exception(
                    ReplyLost(
                        f"{why} before the reply came; the command may or may not have "
                        "been applied: retry with the same message_id"
                    )
                )

    def _forget(self, correlation_id: str) -> None:
        pending = self._pending.pop(correlation_id, None)
        if pending is None:
            return
        if pending.future.done() and not pending.future.cancelled():
            pending.future.exception()  # retrieved: no "never retrieved" warning
        else:
            pending.future.cancel()


def _checked_message_id(message_id: str | None) -> str:
    if message_id is None:
        return new_message_id()
    if not message_id or len(message_id.encode()) > MESSAGE_ID_MAX_LENGTH:
        raise ValueError(f"message_id must be 1 to {MESSAGE_ID_MAX_LENGTH} bytes")
    return message_id


def _known(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    return {key: value for key, value in data.items() if key in OkReply.model_fields}
