"""The outbox publisher: events recorded with their change, published afterwards.

A batch that crosses a usage threshold writes the event into the ``outbox``
table in its own transaction, so the event exists exactly when the change
does. This loop, one per worker, publishes the unpublished events of the
partitions the worker holds, waits for the broker's confirms, then marks them
published. A crash between the confirm and the mark publishes the same event
again (same ``message_id``, same body): consumers deduplicate on the id.
"""

import asyncio
import contextlib
from collections.abc import Callable, Collection, Sequence
from typing import Protocol

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractExchange, DeliveryMode
from structlog.typing import FilteringBoundLogger

from token_budget.client.connection import CONNECTION_ERRORS, is_open
from token_budget.schemas import CONTENT_TYPE, EVENTS_EXCHANGE
from token_budget.worker.backoff import RetryPolicy, pause
from token_budget.worker.domain.outcomes import PendingEvent
from token_budget.worker.errors import StorageUnavailable
from token_budget.worker.metrics import OUTBOX_BACKLOG
from token_budget.worker.store.db import is_transient

__all__ = ["EventStore", "OutboxPublisher"]


class EventStore(Protocol):
    """What the publisher needs of the database (``BudgetService`` has it)."""

    async def pending_events(
        self, partitions: Collection[int] | None, *, limit: int = ...
    ) -> list[PendingEvent]: ...

    async def pending_count(self, partitions: Collection[int] | None) -> int: ...

    async def mark_published(self, ids: Sequence[int]) -> None: ...


class OutboxPublisher:
    """Publishes recorded events in order, at least once, each under its own id."""

    def __init__(
        self,
        store: EventStore,
        connection: AbstractConnection,
        *,
        partitions: Callable[[], Collection[int] | None],
        poll_interval: float,
        retry: RetryPolicy,
        log: FilteringBoundLogger,
        wake: asyncio.Event | None = None,
        batch: int = 500,
    ) -> None:
        """``wake``: set after a commit that recorded events (``BudgetService``'s
        ``on_events``), so they go out now rather than at the next poll."""
        self._store = store
        self._connection = connection
        self._partitions = partitions
        self._poll = poll_interval
        self._log = log.bind(task="outbox")
        self._batch = batch
        self._wake = wake if wake is not None else asyncio.Event()
        self._retry = retry
        #: Events published since start (for logs and tests).
        self.published = 0

    def notify(self) -> None:
        """A commit recorded events: publish now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Publish until cancelled or the connection is gone; retry after failures."""
        backoff = self._retry.backoff()
        while is_open(self._connection):
            try:
                channel = await self._connection.channel(publisher_confirms=True)
                try:
                    exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=False)
                    backoff.reset()
                    await self._serve(exchange)
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not is_open(self._connection):
                    return
                level = "warning" if _expected(error) else "error"
                delay = backoff.next()
                log = getattr(self._log, level)
                log("outbox_failed", error=repr(error)[:300], retry_in_s=delay)
                # Not cut short by notify(): a failing publisher backs off.
                await pause(delay)

    async def _serve(self, exchange: AbstractExchange) -> None:
        while True:
            self._wake.clear()
            sent = await self._drain(exchange)
            if sent < self._batch:
                await self._sleep(self._poll)

    async def _drain(self, exchange: AbstractExchange) -> int:
        partitions = self._partitions()
        events = await self._store.pending_events(partitions, limit=self._batch)
        # A short page is the whole backlog; only a full one needs counting.
        backlog = len(events)
        if backlog == self._batch:
            backlog = await self._store.pending_count(partitions)
        OUTBOX_BACKLOG.set(backlog)
        if not events:
            return 0
        # Published in recorded order on one channel; confirms awaited together.
        await asyncio.gather(
            *(exchange.publish(_message(e), e.routing_key, mandatory=False) for e in events)
        )
        await self._store.mark_published([e.id for e in events])
        OUTBOX_BACKLOG.dec(len(events))
        self.published += len(events)
        self._log.info("events_published", count=len(events), first=events[0].event_id)
        return len(events)

    async def _sleep(self, seconds: float) -> None:
        await pause(seconds, self._wake)


def _message(event: PendingEvent) -> aio_pika.Message:
    return aio_pika.Message(
        event.body,
        content_type=CONTENT_TYPE,
        message_id=event.event_id,
        type=event.event_type,
        delivery_mode=DeliveryMode.PERSISTENT,
    )


def _expected(error: BaseException) -> bool:
    return isinstance(error, (StorageUnavailable, *CONNECTION_ERRORS)) or is_transient(error)
