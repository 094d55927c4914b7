"""BudgetService: the rules of budgets and the SQL that keeps them; no AMQP.

Batches are applied in one transaction each, and ``apply_many`` puts several
lanes' batches in one transaction, so a busy worker pays one commit (one
fsync) for hundreds of commands.
"""

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, and_, exc, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from token_budget.schemas import (
    DEFAULT_RESERVATION_TTL_SECONDS,
    ErrorBody,
    ErrorCode,
    ErrorReply,
    encode_reply,
)
from token_budget.worker.domain.outcomes import (
    Envelope,
    Fence,
    Outcome,
    OutcomeKind,
    PendingEvent,
)
from token_budget.worker.domain.state import HoldStatus
from token_budget.worker.errors import Fenced, StorageUnavailable
from token_budget.worker.store.batch import (
    StaleState,
    apply_in_transaction,
    fence_holds,
    fingerprint,
)
from token_budget.worker.store.db import is_transient
from token_budget.worker.store.tables import outbox, reservations

__all__ = ["BudgetService", "FenceLost", "Request", "Result", "StaleState", "fingerprint"]

#: A lane's batch and the lease it runs under.
Request = tuple[Sequence[Envelope], Fence | None]


@dataclass(frozen=True, slots=True)
class FenceLost:
    """A request whose lease had passed on: nothing of it was committed.

    A value, not an exception, so that one lost lease does not fail the
    other lanes' batches that shared the transaction; whoever waits on the
    request raises ``Fenced`` with ``reason``.
    """

    reason: str


#: Per request: its outcomes, or that its lease was lost.
Result = list[Outcome] | FenceLost


def _now() -> datetime:
    return datetime.now(UTC)


class BudgetService:
    """The rules applied to the database: each batch in one transaction, in order.

    Promises: a command is applied at most once per ``message_id`` (its stored
    outcome answers a redelivery), nothing commits under a lost lease, and a
    command the database refuses alone is rejected without failing the rest.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        clock: Callable[[], datetime] = _now,
        reservation_ttl: int = DEFAULT_RESERVATION_TTL_SECONDS,
        on_events: Callable[[], None] | None = None,
    ) -> None:
        """``reservation_ttl``: seconds a hold lives when its reserve names none.
        ``on_events``: called after a commit that recorded outbox events."""
        self._engine = engine
        self._clock = clock
        self._ttl = reservation_ttl
        self._lock_rows = engine.dialect.name == "postgresql"
        self._on_events = on_events

    async def apply(self, batch: Sequence[Envelope], fence: Fence | None = None) -> list[Outcome]:
        """Apply ``batch`` in order and commit; one outcome per envelope.

        With a ``fence``, the transaction first checks (and locks) the lease:
        if the partition has passed to another owner it raises ``Fenced`` and
        commits nothing. Transient database errors raise ``StorageUnavailable``
        (retry the same batch later). Any other database error is isolated by
        splitting the batch: the commands around the culprit are applied, the
        culprit alone gets a ``rejected`` outcome.
        """
        (result,) = await self.apply_many([(batch, fence)])
        if isinstance(result, FenceLost):
            raise Fenced(result.reason)
        return result

    async def apply_many(self, requests: Sequence[Request]) -> list[Result]:
        """Apply several lanes' batches in one transaction; one result per request."""
        try:
            try:
                return await self._once(requests)
            except exc.SQLAlchemyError as error:
                if is_transient(error):
                    raise
            # A command broke the shared transaction: find it, keep the rest.
            results: list[Result] = []
            for batch, fence in requests:
                try:
                    results.append(await self._isolating(batch, fence))
                except Fenced as fenced:
                    results.append(FenceLost(str(fenced)))
            return results
        except exc.SQLAlchemyError as error:
            if is_transient(error):
                raise StorageUnavailable(_reason(error)) from error
            raise
        except (OSError, TimeoutError) as error:
            raise StorageUnavailable(str(error)) from error

    async def _once(self, requests: Sequence[Request]) -> list[Result]:
        try:
            return await self._attempt(requests, strict=False)
        except _Recheck:
            return await self._attempt(requests, strict=True)

    async def _attempt(self, requests: Sequence[Request], *, strict: bool) -> list[Result]:
        """One transaction for ``requests``.

        A request that changes state checks its lease first. A batch of
        queries writes nothing, so it checks only if it turns out to write
        (a hold expiring on the way); if its lease is gone by then, the whole
        transaction is redone with every lease checked first (``strict``).
        """
        results: list[Result | None] = [None] * len(requests)
        items: list[tuple[Envelope, Fence | None]] = []
        live: list[int] = []
        unchecked: list[int] = []
        async with self._engine.begin() as conn:
            # Lease rows locked in partition order, so two transactions never
            # wait on each other in a circle.
            order = sorted(range(len(requests)), key=lambda i: _partition_key(requests[i][1]))
            for index in order:
                batch, fence = requests[index]
                if fence is None:
                    continue
                if not strict and not any(e.command.changes_state for e in batch):
                    unchecked.append(index)
                elif not await fence_holds(conn, fence):
                    results[index] = FenceLost(
                        f"partition {fence.partition} is no longer held under epoch {fence.epoch}"
                    )
            for index, (batch, fence) in enumerate(requests):
                if results[index] is None:
                    live.append(index)
                    items.extend((envelope, fence) for envelope in batch)
            applied = await apply_in_transaction(
                conn, items, now=self._clock(), lock_rows=self._lock_rows, default_ttl=self._ttl
            )
            for index in unchecked:
                batch, fence = requests[index]
                touched = {e.command.key for e in batch} & applied.written
                if touched and fence is not None and not await fence_holds(conn, fence):
                    raise _Recheck()
        if applied.events and self._on_events is not None:
            self._on_events()
        outcomes = applied.outcomes
        position = 0
        for index in live:
            size = len(requests[index][0])
            results[index] = outcomes[position : position + size]
            position += size
        return [r if r is not None else [] for r in results]

    # -- the outbox and the sweeper's reads (worker/tasks/outbox.py, worker/tasks/sweeper.py) --

    async def pending_events(
        self, partitions: Collection[int] | None, *, limit: int = 500
    ) -> list[PendingEvent]:
        """Unpublished events of ``partitions`` (all if None) in the order recorded.

        Events recorded outside a pool (no partition) go with every partition.
        """
        query = select(
            outbox.c.id, outbox.c.event_id, outbox.c.routing_key, outbox.c.event_type, outbox.c.body
        ).where(_unpublished(partitions))
        async with self._engine.connect() as conn:
            rows = await conn.execute(query.order_by(outbox.c.id).limit(limit))
            return [PendingEvent(i, e, r, t, b.encode()) for i, e, r, t, b in rows]

    async def pending_count(self, partitions: Collection[int] | None) -> int:
        """How many events ``pending_events`` would return without a limit."""
        query = select(func.count()).select_from(outbox).where(_unpublished(partitions))
        async with self._engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def mark_published(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        async with self._engine.begin() as conn:
            await conn.execute(
                update(outbox)
                .where(outbox.c.id.in_(list(ids)))
                .where(outbox.c.published_at.is_(None))
                .values(published_at=self._clock())
            )

    async def overdue_agents(self, *, limit: int = 1000) -> list[str]:
        """Agents with an open hold past its deadline, most overdue first."""
        deadline = func.min(reservations.c.expires_at)
        query = (
            select(reservations.c.agent_id)
            .where(reservations.c.status == HoldStatus.OPEN)
            .where(reservations.c.expires_at <= self._clock())
            .group_by(reservations.c.agent_id)
            .order_by(deadline, reservations.c.agent_id)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return [agent_id for (agent_id,) in await conn.execute(query)]

    async def _isolating(self, batch: Sequence[Envelope], fence: Fence | None) -> list[Outcome]:
        try:
            return await self._single(batch, fence)
        except exc.SQLAlchemyError as error:
            if is_transient(error):
                raise
            if len(batch) > 1:
                middle = len(batch) // 2
                head = await self._isolating(batch[:middle], fence)
                return head + await self._isolating(batch[middle:], fence)
        # One command alone failed: try once more, since a race with another
        # writer (the same message_id on two lanes) clears on a second look.
        try:
            return await self._single(batch, fence)
        except exc.SQLAlchemyError as error:
            if is_transient(error):
                raise
            return [_rejected(error)]

    async def _single(self, batch: Sequence[Envelope], fence: Fence | None) -> list[Outcome]:
        (result,) = await self._once([(batch, fence)])
        if isinstance(result, FenceLost):
            raise Fenced(result.reason)
        return result


class _Recheck(Exception):
    """A batch of queries wrote after all, under a lease it no longer holds."""


def _partition_key(fence: Fence | None) -> int:
    return -1 if fence is None else fence.partition


def _reason(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return (text.splitlines() or [type(error).__name__])[0][:500]


def _rejected(error: exc.SQLAlchemyError) -> Outcome:
    reason = _reason(error)
    error_reply = ErrorReply(
        error=ErrorBody(
            code=ErrorCode.DATABASE_REJECTED, message=f"the database refused the command: {reason}"
        )
    )
    return Outcome(OutcomeKind.REJECTED, error_reply, encode_reply(error_reply))


def _unpublished(partitions: Collection[int] | None) -> ColumnElement[bool]:
    """Outbox rows not yet published, of ``partitions`` (all if None); rows
    recorded outside a pool (no partition) go with every partition."""
    pending = outbox.c.published_at.is_(None)
    if partitions is None:
        return pending
    mine = or_(outbox.c.partition.in_(sorted(partitions)), outbox.c.partition.is_(None))
    return and_(pending, mine)
