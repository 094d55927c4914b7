"""A lane: one partition queue, consumed in order and applied in batches.

Deliveries arrive on the lane's own channel (``multiple=True`` acknowledges
per channel) and wait in an inbox; the loop takes what has arrived, up to
``batch_max``, applies it in one transaction, publishes events and dead
letters with confirms and replies without (a lost reply costs the agent a
retry, which the stored outcome answers), then acknowledges the batch at
once. A crash at any point leaves the batch unacknowledged, and its
redelivery finds the processed-command records.
"""

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, assert_never

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from structlog.typing import FilteringBoundLogger

from token_budget.client.connection import is_open
from token_budget.schemas import (
    ErrorCode,
    ErrorReply,
    LaneMap,
)
from token_budget.worker.backoff import Backoff, RetryPolicy, pause
from token_budget.worker.broker.acks import Disposition, Settlement, settle, settle_failure
from token_budget.worker.broker.admission import admit, refuse_unauthorized
from token_budget.worker.broker.auth import AuthPolicy
from token_budget.worker.broker.batch_log import log_batch
from token_budget.worker.broker.batch_metrics import count_batch
from token_budget.worker.broker.consumer import Delivery, consume
from token_budget.worker.broker.decode import Invalid
from token_budget.worker.broker.delivery import can_reply, reply_body
from token_budget.worker.broker.publisher import DRAIN_MARKER, Publisher
from token_budget.worker.broker.wire_guard import clean_text
from token_budget.worker.domain.outcomes import (
    CommandApplier,
    Envelope,
    Fence,
    Outcome,
    OutcomeKind,
)
from token_budget.worker.errors import Fenced
from token_budget.worker.metrics import LANE_UNAPPLIED, STORAGE_RETRIES

__all__ = ["QUERIES_INDEX", "DrainListener", "Lane", "LaneConfig"]

_STOP: Any = object()
#: The index of the lane that serves ``budget.queries`` (in logs and in the
#: ``x-budget-lane`` header of its dead letters).
QUERIES_INDEX = -1


@dataclass(frozen=True, slots=True)
class LaneConfig:
    """What every lane of a worker shares: limits, retry policy, logging, auth, lane map."""

    prefetch: int
    batch_max: int
    max_body_bytes: int
    #: Backoff of a batch the database cannot take now, and of the lane's restarts.
    retry: RetryPolicy
    #: Add each command's [message_id, agent, type, tokens, outcome] to
    #: ``batch_applied``; without it the line only summarises the batch.
    log_ops: bool = True
    #: Told how many commands each batch settled (the worker's heartbeat line).
    on_settled: Callable[[int], None] | None = None
    #: Checked per command before its batch reaches the database.
    auth: AuthPolicy = field(default_factory=AuthPolicy)
    #: Which lane each agent belongs to; None only for tools and tests that
    #: consume lanes of their own.
    lanes: LaneMap | None = None
    #: The lane serves ``budget.queries``: only committed queries, reached by
    #: the queue's name rather than the agent's.
    queries_only: bool = False


class DrainListener(Protocol):
    """The routing upgrade, as a lane draining the legacy routing sees it
    (worker/tasks/upgrade.py)."""

    async def is_drained(self, partition: int) -> bool: ...

    async def drained(self, partition: int) -> None: ...


class _Requeued(Exception):
    """The batch in hand was not committed and went back to the broker."""


@dataclass(slots=True)
class _Batch:
    """The deliveries of one batch, on the channel they arrived on."""

    messages: list[Delivery]
    channel: AbstractChannel
    #: The aiormq channel under ``channel``, which the deliveries came on.
    underlay: aiormq.abc.AbstractChannel
    publisher: "Publisher"
    backoff: Backoff

    @property
    def last(self) -> Delivery:
        return self.messages[-1]


class Lane:
    """One partition queue, applied in delivery order, each batch committed
    before any of it is answered or acknowledged.

    Promises: per-agent order (one consumer, batches in delivery-tag order),
    replies and dead letters only after commit, nothing acknowledged that was
    not committed. A lane stops for good once fenced (its lease moved on).
    """

    def __init__(
        self,
        index: int,
        queue_name: str,
        connection: AbstractConnection,
        applier: CommandApplier,
        config: LaneConfig,
        log: FilteringBoundLogger,
        fence: Fence | None = None,
        draining: DrainListener | None = None,
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
        #: Set while this lane drains what the legacy exchange routed: no lane
        #: guard (the old ring placed those commands), and a marker to find
        #: the end of them.
        self._draining = draining
        self._marker: str | None = None
        #: Deliveries dead-lettered because they belong to another lane.
        self.misrouted = 0
        self._unapplied = LANE_UNAPPLIED.labels("queries" if index == QUERIES_INDEX else str(index))

    def stop(self) -> None:
        """Finish the batch in hand, then close: the rest goes back to the broker."""
        self._stopping = True
        self._wake.set()
        self._inbox.put_nowait(_STOP)

    async def run(self) -> None:
        """Serve until stopped or the connection is gone; restart after failures."""
        backoff = self._retry_backoff()
        while not self._stopping and is_open(self._connection):
            try:
                await self._serve()
                backoff.reset()
            except _Requeued as requeued:
                if isinstance(requeued.__cause__, Fenced):
                    # Another worker owns the partition now and applies the batch.
                    self._log.warning("lane_fenced", reason=str(requeued.__cause__))
                    return
                if self._stopping or not is_open(self._connection):
                    break
                delay = backoff.next()
                self._log.error("lane_failed", error=repr(requeued.__cause__), retry_in_s=delay)
                await self._pause(delay)
            except Exception as error:
                if self._stopping or not is_open(self._connection):
                    break
                delay = backoff.next()
                self._log.error("lane_failed", error=repr(error), retry_in_s=delay)
                await self._pause(delay)

    async def _serve(self) -> None:
        channel = await self._connection.channel(publisher_confirms=False)
        publisher = await Publisher.open(self._connection, channel)
        try:
            await channel.set_qos(prefetch_count=self._config.prefetch)
            underlay = await channel.get_underlay_channel()
            self._inbox = asyncio.Queue()
            if self._stopping:
                return
            await consume(underlay, self.queue_name, self._arrived)
            self._log.debug("lane_consuming", queue=self.queue_name)
            await self._start_drain(publisher)
            while not self._stopping:
                messages = await self._take()
                if messages:
                    batch = _Batch(messages, channel, underlay, publisher, self._retry_backoff())
                    try:
                        await self._process(batch)
                    except _Requeued:
                        raise
                    except Exception as error:
                        # Failed after (or without) its commit, e.g. a publish:
                        # the redelivery finds the stored outcomes.
                        await self._act(Disposition.REQUEUE, batch, error=error)
        finally:
            # Closing (not cancelling first) returns every unacknowledged
            # delivery at once, so the next consumer starts where we stopped.
            await _close(publisher.channel)
            await _close(channel)
            # Every delivery not settled went back with the channel.
            self._unapplied.set(0)

    def _arrived(self, message: Delivery) -> None:
        self._inbox.put_nowait(message)
        self._unapplied.inc()

    async def _take(self) -> list[Delivery]:
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
        batch.sort(key=lambda message: message.delivery_tag)
        return batch

    async def _start_drain(self, publisher: Publisher) -> None:
        """In draining mode, put a marker of our own behind everything queued."""
        if self._draining is None:
            return
        if await self._draining.is_drained(self.index):
            self._draining = None
            return
        self._marker = uuid.uuid4().hex
        await publisher.drain_marker(self.queue_name, self._marker)
        self._log.info("lane_draining", queue=self.queue_name)

    async def _process(self, work: _Batch) -> None:
        drained = False
        batch = work.messages
        if self._draining is not None:
            batch, drained = self._take_markers(batch)
            if not batch:
                await self._act(Disposition.ACK, work)
                self._unapplied.dec(len(work.messages))
                return await self._drained(drained)
        started = time.perf_counter()
        decoded = [self._decode(message) for message in batch]
        # An unauthorized command never reaches the database: nothing of it is
        # recorded, so nobody can burn another agent's message_id.
        refused = [
            refuse_unauthorized(message, item, self._config.auth, self._log)
            for message, item in zip(batch, decoded, strict=True)
        ]
        envelopes = [
            item
            for item, refusal in zip(decoded, refused, strict=True)
            if isinstance(item, Envelope) and refusal is None
        ]
        outcomes = iter(await self._apply(envelopes, work))
        results: list[Outcome | Invalid] = [
            item if isinstance(item, Invalid) else refusal if refusal else next(outcomes)
            for item, refusal in zip(decoded, refused, strict=True)
        ]
        publisher = work.publisher
        pending: list[Awaitable[Any]] = []
        for message, item, result in zip(batch, decoded, results, strict=True):
            settlement = settle(result, has_reply_to=can_reply(message))
            if settlement.disposition is not Disposition.ACK:
                # An ACK is the batch's one acknowledgement below: no task per delivery.
                pending.append(self._act(settlement.disposition, work, message, settlement))
            if can_reply(message):
                duplicate = isinstance(result, Outcome) and result.kind is OutcomeKind.DUPLICATE
                pending.append(publisher.reply(message, reply_body(result), duplicate=duplicate))
            if settlement.event and isinstance(item, Envelope) and isinstance(result, Outcome):
                assert isinstance(result.reply, ErrorReply)
                pending.append(publisher.refused(item.command, item.message_id, result.reply))
        await asyncio.gather(*pending)
        # Everything the batch published is confirmed: now its one acknowledgement.
        await self._act(Disposition.ACK, work)
        self._unapplied.dec(len(work.messages))
        seconds = time.perf_counter() - started
        count_batch(decoded, results, seconds)
        log_batch(self._log, batch, decoded, results, seconds, self._config.log_ops)
        if self._config.on_settled is not None:
            self._config.on_settled(len(batch))
        await self._drained(drained)

    async def _act(
        self,
        disposition: Disposition,
        work: _Batch,
        message: Delivery | None = None,
        settlement: Settlement | None = None,
        error: BaseException | None = None,
    ) -> None:
        """The one place the lane carries out a disposition (broker/acks.py decides it).

        With ``message``, for that delivery of a committed batch; without, for
        the whole batch.
        """
        match disposition:
            case Disposition.ACK:
                if message is None:
                    # The batch's last delivery: one acknowledgement covers it and all before.
                    await work.underlay.basic_ack(work.last.delivery_tag, multiple=True)
            case Disposition.DEAD_LETTER:
                assert message is not None and settlement is not None
                await work.publisher.dead_letter(
                    message,
                    code=str(settlement.error_code),
                    reason=settlement.reason or "",
                    lane=self.index,
                )
            case Disposition.RETRY:
                # Not committed, the database may take it later: hold the
                # batch unacknowledged, back off, apply it again.
                delay = work.backoff.next()
                STORAGE_RETRIES.inc()
                self._log.warning("storage_unavailable", error=str(error), retry_in_s=delay)
                await self._pause(delay)
                if self._stopping:
                    await self._act(Disposition.REQUEUE, work, error=error)
            case Disposition.REQUEUE:
                # Closing the channel returns every unacknowledged delivery at
                # once and in order; acking or nacking single ones could let a
                # later command of the same agent overtake.
                await _close(work.publisher.channel)
                await _close(work.channel)
                raise _Requeued() from error
            case _:
                assert_never(disposition)

    def _take_markers(self, batch: list[Delivery]) -> tuple[list[Delivery], bool]:
        """The batch without drain markers; True if ours is among them.

        A marker of a former owner of this lane (which died draining) is
        acknowledged with the batch and logged: only our own marks the end.
        """
        kept: list[Delivery] = []
        ours = False
        for message in batch:
            marker = (message.headers or {}).get(DRAIN_MARKER)
            if marker is None:
                kept.append(message)
            elif marker == self._marker:
                ours = True
            else:
                self._log.info("drain_marker_stale", marker=clean_text(str(marker)))
        return kept, ours

    async def _drained(self, drained: bool) -> None:
        if not drained or self._draining is None:
            return
        # Everything the legacy exchange put on this lane is applied and
        # acknowledged: from here on only stable routing feeds it.
        await self._draining.drained(self.index)
        self._draining = None
        self._log.info("lane_drained", queue=self.queue_name)

    def _decode(self, message: Delivery) -> Envelope | Invalid:
        config = self._config
        item = admit(
            message,
            index=self.index,
            max_body_bytes=config.max_body_bytes,
            queries_only=config.queries_only,
            lanes=config.lanes if self._draining is None else None,
            log=self._log,
        )
        if isinstance(item, Invalid) and item.code is ErrorCode.WRONG_LANE:
            self.misrouted += 1
        return item

    async def _apply(self, envelopes: list[Envelope], work: _Batch) -> list[Outcome]:
        while True:
            try:
                return await self._applier.apply(envelopes, self.fence)
            except Exception as error:
                await self._act(settle_failure(error), work, error=error)

    def _retry_backoff(self) -> Backoff:
        return self._config.retry.backoff()

    async def _pause(self, seconds: float) -> None:
        await pause(seconds, self._wake)


async def _close(channel: AbstractChannel) -> None:
    with contextlib.suppress(Exception):
        if not channel.is_closed:
            await channel.close()
