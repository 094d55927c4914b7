"""The worker process: connect, declare, run every lane, reconnect, stop cleanly."""

import asyncio
import contextlib
import os
import socket
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import create_engine, is_transient, redact_url
from .lane import Lane, LaneConfig
from .logging import get_logger
from .migrate import upgrade
from .service import BudgetService
from .settings import Settings
from .topology import TopologyError, TopologySpec, declare_topology

__all__ = ["Worker", "connect_amqp"]


async def connect_amqp(settings: Settings, *, name: str) -> AbstractConnection:
    """A plain (not robust) connection: the worker rebuilds everything itself on
    loss, which avoids connect_robust's known restore gaps (aio-pika #231, #626)."""
    return await aio_pika.connect(
        settings.amqp_url.get_secret_value(),
        heartbeat=settings.heartbeat,
        client_properties={"connection_name": name},
        timeout=10,
    )


class Worker:
    """Runs until ``stop()``; survives broker restarts by reconnecting."""

    def __init__(self, settings: Settings, *, topology: TopologySpec | None = None) -> None:
        self.settings = settings
        self.topology = topology or TopologySpec(settings.partitions, settings.delivery_limit)
        self.ready = asyncio.Event()
        self.lanes: list[Lane] = []
        self.name = f"budget-worker {socket.gethostname()}:{os.getpid()}"
        self._stop = asyncio.Event()
        self._log = get_logger(worker=self.name)
        self._engine: AsyncEngine | None = None

    def stop(self) -> None:
        self._stop.set()
        for lane in self.lanes:
            lane.stop()

    async def run(self) -> None:
        settings = self.settings
        database_url = settings.database_url.get_secret_value()
        self._engine = create_engine(database_url, pool_size=settings.db_pool_size)
        self._log.info(
            "worker_starting",
            amqp=redact_url(settings.amqp_url.get_secret_value()),
            database=redact_url(database_url),
            partitions=self.topology.partitions,
        )
        try:
            if settings.migrate_on_start:
                await self._until_done("migrate", lambda: upgrade(self._require_engine()))
            service = BudgetService(self._require_engine())
            delay = 0.2
            while not self._stop.is_set():
                try:
                    await self._serve(service)
                    delay = 0.2
                except TopologyError:
                    raise
                except (ConnectionError, OSError, TimeoutError, aio_pika.exceptions.AMQPError) as e:
                    self._log.warning("broker_unavailable", error=repr(e), retry_in_s=delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), timeout=delay)
                    delay = min(delay * 2, settings.retry_max_seconds)
        finally:
            self.ready.clear()
            await self._require_engine().dispose()
            self._log.info("worker_stopped")

    async def _serve(self, service: BudgetService) -> None:
        connection = await connect_amqp(self.settings, name=self.name)
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        try:
            names = await declare_topology(connection, self.topology)
            config = LaneConfig(
                prefetch=self.settings.prefetch,
                batch_max=self.settings.batch_max,
                max_body_bytes=self.settings.max_body_bytes,
                retry_max_seconds=self.settings.retry_max_seconds,
                log_ops=self.settings.log_level.lower() in ("debug", "info"),
            )
            self.lanes = [
                Lane(index, name, connection, service, config, self._log)
                for index, name in enumerate(names)
            ]
            tasks = [asyncio.create_task(lane.run(), name=lane.queue_name) for lane in self.lanes]
            if self._stop.is_set():
                for lane in self.lanes:
                    lane.stop()
            self._log.info("worker_ready", lanes=len(self.lanes))
            self.ready.set()
            stop_wait = asyncio.create_task(self._stop.wait())
            lost_wait = asyncio.create_task(lost.wait())
            await asyncio.wait([stop_wait, lost_wait], return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            lost_wait.cancel()
            self.ready.clear()
            for lane in self.lanes:
                lane.stop()
            # Lanes finish the batch in hand and close their channels.
            await asyncio.gather(*tasks, return_exceptions=True)
            if lost.is_set() and not self._stop.is_set():
                raise ConnectionError("connection to the broker lost")
        finally:
            self.ready.clear()
            with contextlib.suppress(Exception):
                await connection.close()

    async def _until_done(self, what: str, step: Any) -> None:
        """Retry a start-up step while the database is away, until stopped."""
        delay = 0.2
        while True:
            try:
                await step()
                return
            except Exception as error:
                if not is_transient(error):
                    raise
                failure: BaseException = error
            if self._stop.is_set():
                raise failure
            self._log.warning(f"{what}_failed", error=str(failure)[:300], retry_in_s=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            delay = min(delay * 2, self.settings.retry_max_seconds)

    def _require_engine(self) -> AsyncEngine:
        assert self._engine is not None
        return self._engine
