"""The upgrade from the legacy consistent-hash routing to stable routing.

Contract 1.1 deployments route by an ``x-consistent-hash`` ``budget.commands``,
whose ring can put an agent on another lane after a broker restart. Switching
the exchange while lanes still hold commands it routed would let an agent's
new commands, routed by the new function, overtake its old ones. So:

1. ``declare_topology`` unbinds every lane from the legacy exchange: nothing
   more arrives by it (a mandatory publish comes back, and the SDK raises
   ``NotDelivered``; retrying is safe).
2. Each lane drains what it holds as the old workers would have (no lane
   guard: the old ring placed those commands) and puts a marker of its own at
   the back of its queue. Once the marker's batch is acknowledged, every
   command ahead of it is applied, and the partition is recorded here.
3. Once every partition is recorded, one worker, under a database lock,
   switches ``budget.commands`` to the stable front exchange.

Each step survives a crash: a lane that dies draining is drained again by
its next owner (a former owner's marker is skipped), and a switch that dies
half-way is finished by the next worker to declare the topology.
"""

import asyncio

from aio_pika.abc import AbstractConnection
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.typing import FilteringBoundLogger

from token_budget.client.connection import is_open
from token_budget.worker.backoff import pause
from token_budget.worker.broker.topology import TopologySpec, switch_routing
from token_budget.worker.store.leases import db_now
from token_budget.worker.store.tables import routing_drains

__all__ = ["RoutingUpgrade"]

#: Key of the PostgreSQL advisory lock the switch holds (any fixed number).
_PG_SWITCH_LOCK = 0x42554448


class RoutingUpgrade:
    """Records drained lanes and switches the routing once all are drained."""

    def __init__(
        self,
        engine: AsyncEngine,
        spec: TopologySpec,
        *,
        worker_id: str,
        log: FilteringBoundLogger,
        check_interval: float = 1.0,
    ) -> None:
        self._engine = engine
        self._spec = spec
        self._worker_id = worker_id
        self._log = log.bind(task="routing_upgrade")
        self._interval = check_interval
        self._wake = asyncio.Event()
        #: Set once ``budget.commands`` routes stably (switched here or elsewhere).
        self.switched = asyncio.Event()

    async def is_drained(self, partition: int) -> bool:
        async with self._engine.connect() as conn:
            found = await conn.execute(
                select(routing_drains.c.partition).where(routing_drains.c.partition == partition)
            )
            return found.first() is not None

    async def drained(self, partition: int) -> None:
        insert = pg_insert if self._engine.dialect.name == "postgresql" else sqlite_insert
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(routing_drains)
                .values(
                    partition=partition,
                    worker_id=self._worker_id,
                    drained_at=db_now(self._engine.dialect.name),
                )
                .on_conflict_do_nothing(index_elements=["partition"])
            )
        self._wake.set()

    async def drained_count(self) -> int:
        async with self._engine.connect() as conn:
            count = await conn.execute(select(func.count()).select_from(routing_drains))
            return int(count.scalar_one())

    async def run(self, connection: AbstractConnection) -> None:
        """Wait until every partition is drained, then switch; return when switched."""
        while is_open(connection):
            try:
                if await self.drained_count() >= self._spec.partitions:
                    await self._switch(connection)
                    self.switched.set()
                    return
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the next look may succeed; lanes go on
                self._log.warning("routing_switch_failed", error=repr(error)[:300])
            self._wake.clear()
            await pause(self._interval, self._wake)

    async def _switch(self, connection: AbstractConnection) -> None:
        # One switch at a time: the lock holder finds the legacy exchange and
        # replaces it; whoever comes next finds the stable one and declares
        # nothing new.
        async with self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                lock = text("SELECT pg_advisory_xact_lock(:key)")
                await conn.execute(lock, {"key": _PG_SWITCH_LOCK})
            await switch_routing(connection, self._spec)
        self._log.info("routing_switched", partitions=self._spec.partitions)
