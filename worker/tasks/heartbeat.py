"""The worker's heartbeat line: proof of life in the log when nothing happens.

``batch_applied`` lines appear only while commands flow; an idle worker would
otherwise say nothing for hours. Every ``BUDGET_LOG_HEARTBEAT_SECONDS`` one line
says which lanes it holds and how many commands it settled since the last one.
"""

import asyncio
from collections.abc import Callable, Collection

from structlog.typing import FilteringBoundLogger

__all__ = ["Tally", "beat"]


class Tally:
    """Commands settled by every lane of a worker since the last heartbeat."""

    def __init__(self) -> None:
        self._count = 0

    def add(self, commands: int) -> None:
        self._count += commands

    def take(self) -> int:
        """The count so far, and start again from zero."""
        count, self._count = self._count, 0
        return count


async def beat(
    tally: Tally,
    lanes: Callable[[], Collection[int]],
    *,
    interval: float,
    log: FilteringBoundLogger,
) -> None:
    """Log ``worker_heartbeat`` every ``interval`` seconds until cancelled."""
    while True:
        await asyncio.sleep(interval)
        log.info(
            "worker_heartbeat",
            lanes=sorted(lanes()),
            commands=tally.take(),
            interval_s=interval,
        )
