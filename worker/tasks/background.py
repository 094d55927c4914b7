"""A worker's background tasks beside its lanes: the outbox publisher, the
hold sweeper and the heartbeat line, started per broker connection and
stopped with it."""

import asyncio
import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractConnection

from token_budget.worker.settings import Settings
from token_budget.worker.store.service import BudgetService
from token_budget.worker.tasks.heartbeat import Tally, beat
from token_budget.worker.tasks.outbox import OutboxPublisher
from token_budget.worker.tasks.sweeper import Sweeper
from token_budget.worker.urls import broker_user

__all__ = ["Background"]


@dataclass
class Background:
    outbox: OutboxPublisher | None
    sweeper: Sweeper
    _service: BudgetService
    _tasks: list["asyncio.Task[None]"] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        service: BudgetService,
        connection: AbstractConnection,
        settings: Settings,
        partitions: Callable[[], Collection[int]],
        log: Any,
        tally: Tally | None = None,
    ) -> "Background":
        outbox = None
        if settings.outbox_publish:
            outbox = OutboxPublisher(
                service,
                connection,
                partitions=partitions,
                poll_interval=settings.outbox_poll_interval,
                log=log,
            )
        sweeper = Sweeper(
            service,
            connection,
            interval=settings.reservation_sweep_interval,
            user_id=broker_user(settings.amqp_url.get_secret_value()),
            log=log,
        )
        started = cls(outbox, sweeper, service)
        if outbox is not None:
            service.on_events = outbox.notify
            started._tasks.append(asyncio.create_task(outbox.run(), name="outbox"))
        started._tasks.append(asyncio.create_task(sweeper.run(), name="sweeper"))
        if tally is not None:
            heartbeat = beat(tally, partitions, interval=settings.log_heartbeat_seconds, log=log)
            started._tasks.append(asyncio.create_task(heartbeat, name="heartbeat"))
        return started

    async def close(self) -> None:
        self._service.on_events = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
