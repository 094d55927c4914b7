"""The lanes of one broker connection, started and stopped as the pool says."""

import asyncio

from aio_pika.abc import AbstractConnection
from structlog.typing import FilteringBoundLogger

from token_budget.worker.broker.lane import DrainListener, Lane, LaneConfig
from token_budget.worker.domain.outcomes import CommandApplier, Fence
from token_budget.worker.metrics import PARTITION_EPOCH, PARTITIONS_HELD

__all__ = ["LaneGroup"]


class LaneGroup:
    """A ``PartitionListener`` (pool/listener.py): one ``Lane`` task per held partition.

    ``revoked`` returns once the lane has finished its batch and closed its
    channel, which returns every unacknowledged delivery to the broker.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        queues: tuple[str, ...],
        applier: CommandApplier,
        config: LaneConfig,
        log: FilteringBoundLogger,
        draining: DrainListener | None = None,
    ) -> None:
        self._connection = connection
        self._queues = queues
        self._applier = applier
        self._config = config
        self._log = log
        self._draining = draining
        self._tasks: dict[int, tuple[Lane, asyncio.Task[None]]] = {}

    @property
    def lanes(self) -> dict[int, Lane]:
        """The lanes started and not yet revoked, by partition."""
        return {partition: lane for partition, (lane, _) in self._tasks.items()}

    def assigned(self, fence: Fence) -> None:
        lane = Lane(
            fence.partition,
            self._queues[fence.partition],
            self._connection,
            self._applier,
            self._config,
            self._log,
            fence=fence,
            draining=self._draining,
        )
        task = asyncio.create_task(lane.run(), name=lane.queue_name)
        self._tasks[fence.partition] = (lane, task)
        PARTITION_EPOCH.labels(str(fence.partition)).set(fence.epoch)
        PARTITIONS_HELD.set(len(self._tasks))

    async def revoked(self, partition: int) -> None:
        lane, task = self._tasks.pop(partition)
        lane.stop()
        # The lane finishes the batch in hand and closes its channel.
        await asyncio.gather(task, return_exceptions=True)
        PARTITION_EPOCH.labels(str(partition)).set(0)
        PARTITIONS_HELD.set(len(self._tasks))

    def running(self) -> dict[int, Fence]:
        return {
            partition: lane.fence
            for partition, (lane, task) in self._tasks.items()
            if not task.done() and lane.fence is not None
        }

    def abort(self) -> None:
        """Stop every lane at once, for a connection that is gone anyway."""
        for partition, (lane, task) in self._tasks.items():
            lane.stop()
            task.cancel()
            PARTITION_EPOCH.labels(str(partition)).set(0)
        PARTITIONS_HELD.set(0)
