"""A lane: one partition queue, consumed in order and applied in batches.

Deliveries arrive on the lane's own channel (``multiple=True`` acknowledges
per channel) and wait in an inbox; the loop takes what has arrived, up to
``batch_max``, applies it in one transaction, publishes replies, events and
dead letters with confirms, then acknowledges the batch at once. A crash at
any point leaves the batch unacknowledged, and its redelivery finds the
processed-command records.
"""

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from schemas import ErrorBody, ErrorCode, ErrorReply, encode_reply

from .acks import Disposition, settle, settle_failure
from .auth import AuthPolicy, authorize, unauthorized_outcome
from .decode import Invalid, decode
from .outcomes import CommandApplier, Envelope, Fence, Fenced, Outcome, OutcomeKind
from .publisher import Publisher
from .wire_guard import clean_text, has_invalid_text

__all__ = ["Lane", "LaneConfig"]

_STOP: Any = object()


@dataclass(frozen=True, slots=True)
class LaneConfig:
    prefetch: int
    batch_max: int
    max_body_bytes: int
    retry_max_seconds: float
    log_ops: bool = True
    #: Checked per command before its batch reaches the database.
    auth: AuthPolicy = field(default_factory=AuthPolicy)


class _Stopping(Exception):
    """Stop was requested while the batch in hand could not be committed."""


class Lane:
    def __init__(
        self,
        index: int,
        queue_name: str,
        connection: AbstractConnection,
        applier: CommandApplier,
        config: LaneConfig,
        log: Any,
        fence: Fence | None = None,
    ) -> None:
        self.index = index
        #: The lease this lane runs under; None only outside a pool (tests, tools).
        self.fence = fence
        self.queue_name = queue_name
        self._connection = connection
        self._applier = applier
        self._config = config
        self._log = log.bind(lane=index)
        self._stopping = False
        self._wake = asyncio.Event()
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()

    def stop(self) -> None:
        """Finish the batch in hand, then close: the rest goes back to the broker."""
        self._stopping = True
        self._wake.set()
        self._inbox.put_nowait(_STOP)

    async def run(self) -> None:
        """Serve until stopped or the connection is gone; restart after failures."""
        delay = 0.1
        while not self._stopping and not self._connection.is_closed:
            try:
                await self._serve()
                delay = 0.1
            except Fenced as error:
                # Another worker owns the partition now; the batch was not
                # committed and went back to the broker with the channel.
                self._log.warning("lane_fenced", reason=str(error))
                return
            except Exception as error:
                if self._stopping or self._connection.is_closed:
                    break
                self._log.error("lane_failed", error=repr(error), retry_in_s=delay)
                await self._pause(delay)
                delay = min(delay * 2, self._config.retry_max_seconds)

    async def _serve(self) -> None:
        channel = await self._connection.channel(publisher_confirms=False)
        publisher = await Publisher.open(self._connection, channel)
        try:
            await channel.set_qos(prefetch_count=self._config.prefetch)
            queue = await channel.get_queue(self.queue_name, ensure=False)
            self._inbox = asyncio.Queue()
            if self._stopping:
                return
            await queue.consume(self._on_message, no_ack=False)
            self._log.debug("lane_consuming", queue=self.queue_name)
            while not self._stopping:
                batch = await self._take()
                if batch:
                    await self._process(batch, publisher)
        finally:
            # Closing (not cancelling first) returns every unacknowledged
            # delivery at once, so the next consumer starts where we stopped.
            await _close(publisher.channel)
            await _close(channel)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._inbox.put_nowait(message)

    async def _take(self) -> list[AbstractIncomingMessage]:
        first = await self._inbox.get()
        if first is _STOP:
            return []
        batch = [first]
        while len(batch) < self._config.batch_max:
            try:
                item = self._inbox.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is _STOP:
                break
            batch.append(item)
        # Callbacks are started in delivery order; sorting by tag makes it so.
        batch.sort(key=lambda message: message.delivery_tag or 0)
        return batch

    async def _process(self, batch: list[AbstractIncomingMessage], publisher: Publisher) -> None:
        started = time.perf_counter()
        decoded = [self._decode(message) for message in batch]
        # An unauthorized command never reaches the database: nothing of it is
        # recorded, so nobody can burn another agent's message_id.
        refused = [
            self._authorize(message, item) for message, item in zip(batch, decoded, strict=True)
        ]
        envelopes = [
            item
            for item, refusal in zip(decoded, refused, strict=True)
            if isinstance(item, Envelope) and refusal is None
        ]
        outcomes = iter(await self._apply(envelopes))
        results: list[Outcome | Invalid] = [
            item if isinstance(item, Invalid) else refusal if refusal else next(outcomes)
            for item, refusal in zip(decoded, refused, strict=True)
        ]
        pending = []
        for message, item, result in zip(batch, decoded, results, strict=True):
            settlement = settle(result, has_reply_to=_can_reply(message))
            if settlement.disposition is Disposition.DEAD_LETTER:
                pending.append(
                    publisher.dead_letter(
                        message,
                        code=str(settlement.error_code),
                        reason=settlement.reason or "",
                        lane=self.index,
                    )
                )
            if _can_reply(message):
                duplicate = isinstance(result, Outcome) and result.kind is OutcomeKind.DUPLICATE
                pending.append(publisher.reply(message, _body(result), duplicate=duplicate))
            if settlement.event and isinstance(item, Envelope) and isinstance(result, Outcome):
                assert isinstance(result.reply, ErrorReply)
                pending.append(publisher.refused(item.command, item.message_id, result.reply))
        await asyncio.gather(*pending)
        await batch[-1].ack(multiple=True)
        self._log_batch(batch, decoded, results, time.perf_counter() - started)

    def _decode(self, message: AbstractIncomingMessage) -> Envelope | Invalid:
        for name in _TEXT_PROPERTIES:
            if has_invalid_text(getattr(message, name)):
                return Invalid(f"property {name} is not valid UTF-8")
        return decode(
            message.body,
            routing_key=message.routing_key,
            message_id=message.message_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            max_body_bytes=self._config.max_body_bytes,
        )

    def _authorize(
        self, message: AbstractIncomingMessage, item: Envelope | Invalid
    ) -> Outcome | None:
        if not isinstance(item, Envelope):
            return None
        error = authorize(item.command, message.user_id, self._config.auth)
        if error is None:
            return None
        self._log.warning(
            "command_unauthorized",
            message_id=clean_text(message.message_id),
            user_id=clean_text(message.user_id),
            agent=item.command.agent_id,
            type=item.command.command_type.value,
        )
        return unauthorized_outcome(error)

    async def _apply(self, envelopes: list[Envelope]) -> list[Outcome]:
        delay = 0.05
        while True:
            try:
                return await self._applier.apply(envelopes, self.fence)
            except Exception as error:
                if settle_failure(error) is not Disposition.RETRY:
                    raise
                self._log.warning("storage_unavailable", error=str(error), retry_in_s=delay)
                await self._pause(delay)
                if self._stopping:
                    raise _Stopping() from error
                delay = min(delay * 2, self._config.retry_max_seconds)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)

    def _log_batch(
        self,
        batch: list[AbstractIncomingMessage],
        decoded: list[Envelope | Invalid],
        results: list[Outcome | Invalid],
        seconds: float,
    ) -> None:
        # One line per batch carries every operation, each as a compact
        # [message_id, agent, type, tokens, outcome]: logging each command on
        # its own line would cost more than applying it.
        ops = []
        counts: dict[str, int] = {}
        log_ops = self._config.log_ops
        for message, item, result in zip(batch, decoded, results, strict=True):
            if isinstance(result, Invalid):
                kind = outcome = "dead_lettered"
                self._log.warning(
                    "command_dead_lettered", message_id=message.message_id, reason=result.reason
                )
            else:
                kind = outcome = result.kind.value
                if not result.reply.ok:
                    outcome = f"{kind}:{result.reply.error.code}"
            counts[kind] = counts.get(kind, 0) + 1
            if log_ops and isinstance(item, Envelope):
                command = item.command
                tokens = getattr(command, "tokens", None)
                ops.append((item.message_id, command.agent_id, command.type, tokens, outcome))
        self._log.info(
            "batch_applied",
            size=len(batch),
            duration_ms=round(seconds * 1000, 3),
            outcomes=counts,
            ops=ops if log_ops else None,
        )


_TEXT_PROPERTIES = (
    "routing_key",
    "message_id",
    "correlation_id",
    "reply_to",
    "content_type",
    "content_encoding",
    "type",
    "app_id",
    "headers",
)


def _can_reply(message: AbstractIncomingMessage) -> bool:
    return bool(message.reply_to) and not has_invalid_text(message.reply_to)


def _body(result: Outcome | Invalid) -> bytes:
    if isinstance(result, Outcome):
        return result.body
    return encode_reply(
        ErrorReply(
            error=ErrorBody(
                code=ErrorCode.INVALID_COMMAND,
                message=result.reason,
                errors=list(result.issues) or None,
            )
        )
    )


async def _close(channel: AbstractChannel) -> None:
    with contextlib.suppress(Exception):
        if not channel.is_closed:
            await channel.close()
