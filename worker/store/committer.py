"""Group commit across lanes: the batches lanes submit share transactions.

Each lane has at most one batch in flight. While a transaction runs, the
other lanes' batches queue here, and the next transaction takes them all:
SQLite (one writer) then pays one fsync for every lane's work, and
PostgreSQL a few commits where there would be one per lane.
"""

import asyncio
import contextlib
from collections.abc import Sequence

from token_budget.worker.domain.outcomes import Envelope, Fence, Outcome
from token_budget.worker.errors import Fenced
from token_budget.worker.store.service import BudgetService, FenceLost

__all__ = ["GroupCommitter"]

_Pending = tuple[Sequence[Envelope], Fence | None, "asyncio.Future[list[Outcome]]"]


class GroupCommitter:
    """A ``CommandApplier`` that merges concurrent ``apply`` calls."""

    def __init__(self, service: BudgetService, *, writers: int = 1, max_commands: int = 4096):
        self._service = service
        self._writers = writers
        self._max_commands = max_commands
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def apply(self, batch: Sequence[Envelope], fence: Fence | None = None) -> list[Outcome]:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._run(), name=f"committer-{i}")
                for i in range(self._writers)
            ]
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((batch, fence, future))
        return await future

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        while not self._queue.empty():
            _, _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(asyncio.CancelledError())

    async def _run(self) -> None:
        while True:
            pending = [await self._queue.get()]
            size = len(pending[0][0])
            while size < self._max_commands and not self._queue.empty():
                item = self._queue.get_nowait()
                pending.append(item)
                size += len(item[0])
            try:
                results = await self._service.apply_many([(b, f) for b, f, _ in pending])
            except asyncio.CancelledError:
                for _, _, future in pending:
                    if not future.done():
                        future.cancel()
                raise
            except BaseException as error:  # every waiter learns why
                for _, _, future in pending:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, _, future), result in zip(pending, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, FenceLost):
                    future.set_exception(Fenced(result.reason))
                else:
                    future.set_result(result)
