"""BudgetService: the rules of budgets and the SQL that keeps them; no AMQP.

Batches are applied in one transaction each, and ``apply_many`` puts several
lanes' batches in one transaction, so a busy worker pays one commit (one
fsync) for hundreds of commands.
"""

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas import ErrorBody, ErrorCode, ErrorReply, encode_reply

from .batch import StaleState, apply_in_transaction, fence_holds, fingerprint
from .db import is_transient
from .outcomes import Envelope, Fence, Fenced, Outcome, OutcomeKind, StorageUnavailable

__all__ = ["BudgetService", "Request", "Result", "StaleState", "fingerprint"]

#: A lane's batch and the lease it runs under.
Request = tuple[Sequence[Envelope], Fence | None]
#: Per request: its outcomes, or why none were committed (``Fenced``).
Result = list[Outcome] | Fenced


def _now() -> datetime:
    return datetime.now(UTC)


class BudgetService:
    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], datetime] = _now) -> None:
        self._engine = engine
        self._clock = clock
        self._lock_rows = engine.dialect.name == "postgresql"

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
        if isinstance(result, Fenced):
            raise result
        return result

    async def apply_many(self, requests: Sequence[Request]) -> list[Result]:
        """Apply several lanes' batches in one transaction; one result per request."""
        requests = [r for r in requests]
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
                    results.append(fenced)
            return results
        except exc.SQLAlchemyError as error:
            if is_transient(error):
                raise StorageUnavailable(_reason(error)) from error
            raise
        except (OSError, TimeoutError) as error:
            raise StorageUnavailable(str(error)) from error

    async def _once(self, requests: Sequence[Request]) -> list[Result]:
        results: list[Result | None] = [None] * len(requests)
        items: list[tuple[Envelope, Fence | None]] = []
        live: list[int] = []
        async with self._engine.begin() as conn:
            # Lease rows locked in partition order, so two transactions never
            # wait on each other in a circle.
            order = sorted(range(len(requests)), key=lambda i: _partition_key(requests[i][1]))
            for index in order:
                fence = requests[index][1]
                if fence is not None and not await fence_holds(conn, fence):
                    results[index] = Fenced(
                        f"partition {fence.partition} is no longer held under epoch {fence.epoch}"
                    )
            for index, (batch, fence) in enumerate(requests):
                if results[index] is None:
                    live.append(index)
                    items.extend((envelope, fence) for envelope in batch)
            outcomes = await apply_in_transaction(
                conn, items, now=self._clock(), lock_rows=self._lock_rows
            )
        position = 0
        for index in live:
            size = len(requests[index][0])
            results[index] = outcomes[position : position + size]
            position += size
        return [r if r is not None else [] for r in results]

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
        if isinstance(result, Fenced):
            raise result
        return result


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
