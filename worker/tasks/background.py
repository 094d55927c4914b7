"""A worker's background tasks beside its lanes: the outbox publisher, the
hold sweeper and the heartbeat line, started per broker connection and
stopped with it."""

import asyncio
import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from aio_pika.abc import AbstractConnection
from structlog.typing import FilteringBoundLogger

from token_budget.worker.settings import Settings
from token_budget.worker.store.service import BudgetService
from token_budget.worker.tasks.heartbeat import Tally, beat
from token_budget.worker.tasks.outbox import OutboxPublisher
from token_budget.worker.tasks.sweeper import Sweeper
from token_budget.worker.urls import broker_user

__all__ = ["Background"]


@dataclass
class Background:
    """The background tasks of one broker connection; ``close`` ends them all."""

    outbox: OutboxPublisher | None
    sweeper: Sweeper
    _tasks: list["asyncio.Task[None]"] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        service: BudgetService,
        connection: AbstractConnection,
        settings: Settings,
        partitions: Callable[[], Collection[int]],
        log: FilteringBoundLogger,
        *,
        outbox_wake: asyncio.Event,
        tally: Tally | None = None,
    ) -> "Background":
        """``outbox_wake``: the event the service sets after recording events
        (its ``on_events``, given when it was made)."""
        outbox = None
        if settings.outbox_publish:
            outbox = OutboxPublisher(
                service,
                connection,
                partitions=partitions,
                poll_interval=settings.outbox_poll_interval,
                retry=settings.retry,
                log=log,
                wake=outbox_wake,
            )
        sweeper = Sweeper(
            service,
            connection,
            interval=settings.reservation_sweep_interval,
            user_id=broker_user(settings.amqp_url.get_secret_value()),
            retry=settings.retry,
            log=log,
        )
        started = cls(outbox, sweeper)
        if outbox is not None:
            started._tasks.append(asyncio.create_task(outbox.run(), name="outbox"))
        started._tasks.append(asyncio.create_task(sweeper.run(), name="sweeper"))
        if tally is not None:
            heartbeat = beat(tally, partitions, interval=settings.log_heartbeat_seconds, log=log)
            started._tasks.append(asyncio.create_task(heartbeat, name="heartbeat"))
        return started

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
