"""Workers running in the test's own event loop."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from token_budget.worker.app import Worker

__all__ = ["running"]


@asynccontextmanager
async def running(*workers: Worker) -> AsyncIterator[list["asyncio.Task[None]"]]:
    """Start ``workers`` together, wait until all are ready; stop them all on exit."""
    tasks = [asyncio.create_task(worker.run()) for worker in workers]
    readiness = asyncio.gather(*(worker.ready.wait() for worker in workers))
    try:
        await asyncio.wait([readiness, *tasks], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                task.result()
        assert all(worker.ready.is_set() for worker in workers), "not ready in 60 s"
        yield tasks
    finally:
        readiness.cancel()
        for worker in workers:
            worker.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
