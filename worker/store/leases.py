"""Pool membership and partition leases, kept in the database the workers share.

Times come from the database's clock, so hosts need not agree on the time.
A lease's ``epoch`` is its fencing token: it grows whenever the partition
changes owner, and every batch commits only if its epoch is still current
(see ``BudgetService.apply``), so a worker that lost a partition while frozen
can never commit for it afterwards.
"""

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Float, cast, delete, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from token_budget.worker.domain.outcomes import Fence
from token_budget.worker.store.tables import partition_leases, workers

__all__ = [
    "Lease",
    "LeaseStore",
    "Member",
    "PoolView",
    "db_now",
    "pool_view",
    "recorded_partitions",
    "session_name",
]

#: A worker not seen for this long is forgotten entirely (it is long dead).
_FORGET_AFTER_SECONDS = 3600.0


#: How long a pool statement waits for a row lock before giving up until the
#: next tick: the pool loop must keep beating even when a peer is stuck.
_LOCK_TIMEOUT_MS = 2000


def session_name(worker_id: str) -> str:
    """The PostgreSQL ``application_name`` of a worker's sessions."""
    return f"budget-worker:{worker_id}"


def db_now(dialect: str) -> ColumnElement[float]:
    """The database's current time in epoch seconds."""
    if dialect == "postgresql":
        return cast(func.extract("epoch", func.clock_timestamp()), Float)
    return cast((func.julianday("now") - 2440587.5) * 86400.0, Float)


@dataclass(frozen=True, slots=True)
class Member:
    """A worker in the pool, as its last beat recorded it."""

    worker_id: str
    name: str
    started_at: float
    heartbeat_at: float


@dataclass(frozen=True, slots=True)
class Lease:
    """Who holds a partition, under which epoch, until when (database time)."""

    partition: int
    owner: str | None
    epoch: int
    expires_at: float


@dataclass(frozen=True, slots=True)
class PoolView:
    """One consistent reading of the pool: live workers, leases, the database's now."""

    now: float
    members: list[Member]
    leases: dict[int, Lease]
    member_ttl: float

    @property
    def live(self) -> list[str]:
        """Worker ids seen within the member TTL, sorted: every worker agrees on it."""
        return sorted(
            m.worker_id for m in self.members if m.heartbeat_at > self.now - self.member_ttl
        )

    def held_by(self, worker_id: str) -> list[int]:
        return sorted(
            p
            for p, lease in self.leases.items()
            if lease.owner == worker_id and lease.expires_at > self.now
        )


class LeaseStore:
    """Partition leases in the shared database, timed by the database's clock.

    Promises: acquiring bumps the epoch, so a former owner's commits are
    fenced; a lease is taken only when free, expired or already ours."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        partitions: int,
        name: str,
        lease_ttl: float,
        member_ttl: float,
        worker_id: str | None = None,
    ) -> None:
        self.engine = engine
        self.partitions = partitions
        self.name = name
        self.worker_id = worker_id or uuid.uuid4().hex
        self.lease_ttl = lease_ttl
        self.member_ttl = member_ttl
        self._now = db_now(engine.dialect.name)

    async def ensure_partitions(self) -> None:
        """Create the lease rows; idempotent when several workers start at once."""
        rows = [
            {"partition": p, "owner": None, "epoch": 0, "expires_at": 0.0}
            for p in range(self.partitions)
        ]
        dialect_insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        async with self.engine.begin() as conn:
            await conn.execute(dialect_insert(partition_leases).on_conflict_do_nothing(), rows)

    async def tick(self) -> PoolView:
        """Beat, renew every lease this worker holds, and read the pool, atomically."""
        async with self.engine.begin() as conn:
            await self._bounded_waits(conn)
            now = float((await conn.execute(select(self._now))).scalar_one())
            beat = await conn.execute(
                update(workers)
                .where(workers.c.worker_id == self.worker_id)
                .values(heartbeat_at=now)
            )
            if beat.rowcount == 0:
                await conn.execute(
                    insert(workers).values(
                        worker_id=self.worker_id, name=self.name, started_at=now, heartbeat_at=now
                    )
                )
            await conn.execute(
                update(partition_leases)
                .where(partition_leases.c.owner == self.worker_id)
                .values(expires_at=now + self.lease_ttl)
            )
            await conn.execute(
                delete(workers).where(workers.c.heartbeat_at < now - _FORGET_AFTER_SECONDS)
            )
            return await _read(conn, now, self.member_ttl)

    async def acquire(self, lease: Lease) -> Fence | None:
        """Take a free or expired partition; None if someone else moved first."""
        async with self.engine.begin() as conn:
            await self._bounded_waits(conn)
            now = self._now
            taken = await conn.execute(
                update(partition_leases)
                .where(partition_leases.c.partition == lease.partition)
                .where(partition_leases.c.epoch == lease.epoch)
                .where(
                    (partition_leases.c.owner.is_(None))
                    | (partition_leases.c.owner == self.worker_id)
                    | (partition_leases.c.expires_at < now)
                )
                .values(
                    owner=self.worker_id, epoch=lease.epoch + 1, expires_at=now + self.lease_ttl
                )
            )
        if taken.rowcount != 1:
            return None
        return Fence(lease.partition, self.worker_id, lease.epoch + 1)

    async def evict(self, worker_id: str) -> int:
        """End a departed worker's database sessions (PostgreSQL); how many ended.

        A worker frozen in the middle of a statement holds its row locks, and
        so its partitions, however long it sleeps: the server cannot tell it
        from a slow client. Once it has left the pool (no beat for the member
        TTL) and its leases have expired, its sessions are terminated; when it
        wakes, its next statement fails and its next batch is fenced.
        """
        if self.engine.dialect.name != "postgresql" or worker_id == self.worker_id:
            return 0
        async with self.engine.begin() as conn:
            ended = await conn.execute(
                select(func.pg_terminate_backend(text("pid")))
                .select_from(text("pg_stat_activity"))
                .where(text("application_name = :name"))
                .where(text("pid <> pg_backend_pid()")),
                {"name": session_name(worker_id)},
            )
            return sum(1 for (done,) in ended if done)

    async def _bounded_waits(self, conn: AsyncConnection) -> None:
        if self.engine.dialect.name == "postgresql":
            await conn.execute(text(f"SET LOCAL lock_timeout = {_LOCK_TIMEOUT_MS}"))

    async def release(self, fence: Fence) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(partition_leases)
                .where(partition_leases.c.partition == fence.partition)
                .where(partition_leases.c.owner == self.worker_id)
                .where(partition_leases.c.epoch == fence.epoch)
                .values(owner=None, expires_at=0.0)
            )

    async def leave(self) -> None:
        """Give up every lease and the membership: the others take over at once."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(partition_leases)
                .where(partition_leases.c.owner == self.worker_id)
                .values(owner=None, expires_at=0.0)
            )
            await conn.execute(delete(workers).where(workers.c.worker_id == self.worker_id))


async def recorded_partitions(engine: AsyncEngine) -> int:
    """How many partitions this database's deployment has (0 before the first start)."""
    async with engine.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(partition_leases))).scalar()
        return int(count or 0)


async def pool_view(engine: AsyncEngine, member_ttl: float) -> PoolView:
    """The pool as the database sees it (for ``budgetctl workers``)."""
    async with engine.connect() as conn:
        now = float((await conn.execute(select(db_now(engine.dialect.name)))).scalar_one())
        return await _read(conn, now, member_ttl)


async def _read(conn: AsyncConnection, now: float, member_ttl: float) -> PoolView:
    members = [
        Member(*row) for row in await conn.execute(select(workers).order_by(workers.c.worker_id))
    ]
    leases: dict[int, Any] = {
        row.partition: Lease(row.partition, row.owner, row.epoch, row.expires_at)
        for row in await conn.execute(
            select(partition_leases).order_by(partition_leases.c.partition)
        )
    }
    return PoolView(now=now, members=members, leases=leases, member_ttl=member_ttl)
