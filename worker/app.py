"""The worker process: connect, declare, run every lane, reconnect, stop cleanly."""

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractConnection
from aiormq.exceptions import ProbableAuthenticationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from token_budget.client.connection import CONNECTION_ERRORS, is_open
from token_budget.schemas import QUERIES_QUEUE, LaneMap
from token_budget.worker.backoff import pause
from token_budget.worker.broker import wire_guard
from token_budget.worker.broker.auth import AuthPolicy
from token_budget.worker.broker.lane import QUERIES_INDEX, Lane, LaneConfig
from token_budget.worker.broker.lanes import LaneGroup
from token_budget.worker.broker.topology import (
    Routing,
    TopologySpec,
    broker_version,
    declare_topology,
    routing_is_stable_on,
)
from token_budget.worker.endpoint import HealthReport
from token_budget.worker.errors import BrokerRefused, TopologyError
from token_budget.worker.logs import get_logger, renders_json
from token_budget.worker.metrics import BROKER_RECONNECTS, report_health
from token_budget.worker.pool.pool import Pool
from token_budget.worker.settings import AuthMode, Settings
from token_budget.worker.store.committer import GroupCommitter
from token_budget.worker.store.db import create_engine, create_reader, retry_while_transient
from token_budget.worker.store.leases import LeaseStore, recorded_partitions, session_name
from token_budget.worker.store.migrate import upgrade
from token_budget.worker.store.queries import CommittedReader
from token_budget.worker.store.service import BudgetService
from token_budget.worker.tasks.background import Background
from token_budget.worker.tasks.heartbeat import Tally
from token_budget.worker.tasks.upgrade import RoutingUpgrade
from token_budget.worker.urls import redact_url

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


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Worker:
    """Runs until ``stop()``; survives broker restarts by reconnecting."""

    def __init__(
        self,
        settings: Settings,
        *,
        topology: TopologySpec | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """``clock``: what decides hold deadlines and period boundaries (UTC
        now by default; tests inject one)."""
        self.settings = settings
        self.clock = clock or _utc_now
        self.topology = topology or TopologySpec(settings.partitions, settings.delivery_limit)
        self.ready = asyncio.Event()
        wire_guard.install()
        self.worker_id = uuid.uuid4().hex
        self.name = f"budget-worker {socket.gethostname()}:{os.getpid()}"
        self.pool: Pool | None = None
        self._group: LaneGroup | None = None
        self.upgrade: RoutingUpgrade | None = None
        #: Broker connections opened so far: 1 while it never reconnected.
        self.connections = 0
        self._pool_stop: Callable[[], None] | None = None
        self._stop = asyncio.Event()
        self._log = get_logger(worker=self.name)
        self._engine: AsyncEngine | None = None
        self._reader: AsyncEngine | None = None
        self._budget: BudgetService | None = None
        #: Commands settled since the last heartbeat line, counted by the lanes.
        self._tally = Tally()
        #: Set by the service after a commit that recorded events: the outbox
        #: publishes them now rather than at its next poll.
        self._outbox_wake = asyncio.Event()
        self._connection: AbstractConnection | None = None
        #: The latest health check (``/healthz``), None before the first.
        self.health: HealthReport | None = None

    @property
    def lanes(self) -> dict[int, Lane]:
        """The lanes it runs now, by partition (for tests and health)."""
        return self._group.lanes if self._group is not None else {}

    def stop(self) -> None:
        """Finish the batches in hand, return the rest, leave the pool."""
        self._stop.set()
        if self._pool_stop is not None:
            self._pool_stop()

    async def run(self) -> None:
        settings = self.settings
        database_url = settings.database_url.get_secret_value()
        self._engine = create_engine(
            database_url,
            pool_size=settings.db_pool_size,
            # Peers find (and, once it is gone, evict) this worker's sessions by it.
            application_name=session_name(self.worker_id),
        )
        #: Committed queries read on connections of their own, never behind a batch.
        self._reader = create_reader(database_url, application_name=session_name(self.worker_id))
        self._log.info(
            "worker_starting",
            amqp=redact_url(settings.amqp_url.get_secret_value()),
            database=redact_url(database_url),
            partitions=self.topology.partitions,
            auth=settings.auth.value,
            admin_users=len(settings.admin_users),
        )
        if settings.auth is AuthMode.USER_ID and not settings.admin_users:
            self._log.warning("no_admin_users", why="nobody can register agents or allocate")
        service: GroupCommitter | None = None
        watching = asyncio.create_task(self._watch_health(), name="health")
        try:
            if settings.migrate_on_start:
                await self._until_done("migrate", lambda: upgrade(self._require_engine()))
            await self._check_partitions()
            engine = self._require_engine()
            self._budget = BudgetService(
                engine,
                clock=self.clock,
                reservation_ttl=settings.reservation_ttl,
                on_events=self._outbox_wake.set,
            )
            service = GroupCommitter(
                self._budget,
                writers=1 if engine.dialect.name == "sqlite" else 2,
                # One lane's batch bound also bounds a shared transaction, and so
                # the memory a transaction holds, whatever the backlog.
                max_commands=settings.batch_max,
            )
            backoff = settings.retry.backoff()
            while not self._stop.is_set():
                try:
                    await self._serve(service)
                    backoff.reset()
                except TopologyError:
                    raise
                except CONNECTION_ERRORS as e:
                    if isinstance(e, ProbableAuthenticationError) and not self.connections:
                        # Never logged in: the URL's user or password is wrong.
                        # Later (a password changed under a running pool) it
                        # is retried like an outage, keeping the lanes' order.
                        raise BrokerRefused(
                            f"the broker refused the login "
                            f"({redact_url(settings.amqp_url.get_secret_value())}): {e}: "
                            "check the user and password in BUDGET_AMQP_URL"
                        ) from None
                    delay = backoff.next()
                    BROKER_RECONNECTS.inc()
                    self._log.warning("broker_unavailable", error=repr(e), retry_in_s=delay)
                    await pause(delay, self._stop)
        finally:
            self.ready.clear()
            watching.cancel()
            report_health(False)
            if service is not None:
                await service.close()
            await self._require_engine().dispose()
            if self._reader is not None:
                await self._reader.dispose()
            self._log.info("worker_stopped")

    async def _serve(self, service: GroupCommitter) -> None:
        connection = await connect_amqp(self.settings, name=self.name)
        self.connections += 1
        self._connection = connection
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        group: LaneGroup | None = None
        queries_task: asyncio.Task[None] | None = None
        background: Background | None = None
        upgrading: asyncio.Task[None] | None = None
        try:
            topology = await declare_topology(connection, self.topology)
            version = broker_version(connection)
            if not routing_is_stable_on(version):
                self._log.warning(
                    "broker_routing_unstable",
                    version=version,
                    why="RabbitMQ 4.2 with Khepri may move agents to other lanes on a restart; "
                    "their commands are then dead-lettered as wrong_lane. Use 4.3+ (or 4.1)",
                )
            config = self._lane_config()
            upgrade = None
            if topology.routing is Routing.DRAINING:
                upgrade = self._routing_upgrade()
                self._log.warning(
                    "routing_upgrade",
                    why="budget.commands is the legacy consistent-hash exchange: its lanes "
                    "are unbound and drained, then it is switched (docs/operations.md)",
                )
                upgrading = asyncio.create_task(upgrade.run(connection), name="routing-upgrade")

            group = LaneGroup(
                connection, topology.lanes, service, config, self._log, draining=upgrade
            )
            self._group = group
            # Every worker answers committed queries, whatever partitions it holds.
            queries = Lane(
                QUERIES_INDEX,
                QUERIES_QUEUE,
                connection,
                CommittedReader(self._reader or self._require_engine(), clock=self.clock),
                dataclasses.replace(config, lanes=None, queries_only=True),
                self._log,
            )
            queries_task = asyncio.create_task(queries.run(), name=QUERIES_QUEUE)
            assert self._budget is not None
            background = Background.start(
                self._budget,
                connection,
                self.settings,
                lambda: set(group.running()),
                self._log,
                outbox_wake=self._outbox_wake,
                tally=self._tally,
            )
            pool = Pool(
                self._lease_store(),
                group,
                renew_interval=self.settings.renew_interval,
                retry=self.settings.retry,
                log=self._log,
            )
            self.pool = pool
            pool_task = asyncio.create_task(pool.run(), name="pool")
            self._pool_stop = pool.stop
            if self._stop.is_set():
                pool.stop()
            waits = [
                asyncio.create_task(self._stop.wait()),
                asyncio.create_task(lost.wait()),
                asyncio.create_task(pool.ticked.wait()),
            ]
            await asyncio.wait([pool_task, *waits], return_when=asyncio.FIRST_COMPLETED)
            if pool.ticked.is_set() and not pool_task.done():
                self._log.info("worker_ready", worker_id=pool.store.worker_id)
                self.ready.set()
                await asyncio.wait([pool_task, *waits[:2]], return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()
            self.ready.clear()
            pool.stop()
            await pool_task  # stops every lane, then leaves the pool
            queries.stop()
            await asyncio.gather(queries_task, return_exceptions=True)
            if lost.is_set() and not self._stop.is_set():
                raise ConnectionError("connection to the broker lost")
        finally:
            self.ready.clear()
            self._connection = None
            self._pool_stop = None
            if upgrading is not None:
                upgrading.cancel()
            if group is not None:
                group.abort()
            if queries_task is not None:
                queries_task.cancel()
            # Closed first, so that every loop on it sees it gone and ends.
            with contextlib.suppress(Exception):
                await connection.close()
            if background is not None:
                await background.close()

    async def _watch_health(self) -> None:
        """Check health every ``health_interval``; the endpoint reads the result."""
        interval = self.settings.health_interval
        while True:
            self.health = await self.check_health(within=max(interval, 1.0))
            report_health(self.health.healthy)
            await asyncio.sleep(interval)

    async def check_health(self, *, within: float) -> HealthReport:
        """Broker connected, database answering, and this worker holding its
        lanes: its last pool tick within the lease TTL (else its leases may be
        another's by now) and a running lane for each partition it holds."""
        connection = self._connection
        broker = "ok" if connection is not None and is_open(connection) else "not connected"
        database = "ok"
        engine = self._reader or self._engine
        try:
            if engine is None:
                raise ConnectionError("no engine yet")
            async with asyncio.timeout(within), engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except TimeoutError:
            database = f"no answer in {within:g} s"
        except Exception as error:
            # The class only: a driver's message may quote the URL.
            database = f"unreachable ({type(error).__name__})"
        pool, group = self.pool, self._group
        held = sorted(group.running()) if group is not None else []
        lanes = "ok"
        if pool is None or pool.last_tick is None or not self.ready.is_set():
            lanes = "not started"
        elif (age := time.monotonic() - pool.last_tick) > self.settings.lease_ttl:
            lanes = f"leases not renewed for {age:.0f} s"
        elif group is not None and len(held) < len(group.lanes):
            lanes = f"{len(group.lanes) - len(held)} lane(s) stopped"
        checks = {"broker": broker, "database": database, "lanes": lanes}
        return HealthReport(checks, extra={"partitions": held})

    async def _check_partitions(self) -> None:
        recorded = await recorded_partitions(self._require_engine())
        if recorded and recorded != self.topology.partitions:
            # More lanes would re-map agents to lanes while their commands
            # are queued; fewer would strand the lanes nobody consumes.
            raise TopologyError(
                f"this database's deployment has {recorded} partitions, not "
                f"BUDGET_PARTITIONS={self.topology.partitions} (docs/operations.md)"
            )

    def _lane_config(self) -> LaneConfig:
        return LaneConfig(
            prefetch=self.settings.prefetch,
            batch_max=self.settings.batch_max,
            max_body_bytes=self.settings.max_body_bytes,
            retry=self.settings.retry,
            # The exact per-command record is for machines (JSON) or debugging;
            # a person reading a terminal gets the batch's summary.
            log_ops=renders_json(self.settings.log_format)
            or self.settings.log_level.lower() == "debug",
            on_settled=self._tally.add,
            auth=AuthPolicy.from_settings(self.settings),
            lanes=LaneMap(self.topology.partitions),
        )

    def _routing_upgrade(self) -> RoutingUpgrade:
        if self.upgrade is None:
            self.upgrade = RoutingUpgrade(
                self._require_engine(),
                self.topology,
                worker_id=self.worker_id,
                log=self._log,
                check_interval=self.settings.renew_interval,
            )
        return self.upgrade

    def _lease_store(self) -> LeaseStore:
        return LeaseStore(
            self._require_engine(),
            partitions=self.topology.partitions,
            name=self.name,
            lease_ttl=self.settings.lease_ttl,
            member_ttl=self.settings.member_ttl,
            worker_id=self.worker_id,
        )

    async def _until_done(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        """Retry a start-up step while the database is away, until stopped."""

        def warn(error: BaseException, delay: float) -> None:
            self._log.warning(f"{what}_failed", error=str(error)[:300], retry_in_s=delay)

        await retry_while_transient(step, stop=self._stop, on_retry=warn, retry=self.settings.retry)

    def _require_engine(self) -> AsyncEngine:
        assert self._engine is not None
        return self._engine
