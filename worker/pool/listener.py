"""How the pool drives the lanes of the partitions it holds.

Modelled on aiokafka's ``ConsumerRebalanceListener`` (``assigned`` /
``revoked``), with the ordering promise written down because the books
depend on it.
"""

from typing import Protocol

from token_budget.worker.domain.outcomes import Fence

__all__ = ["PartitionListener"]


class PartitionListener(Protocol):
    """What runs a partition's lane while the pool holds its lease.

    The pool promises:

    - ``assigned(fence)`` only after the lease was acquired under
      ``fence.epoch``; the lane commits only while that epoch is current.
    - ``revoked(partition)`` before the lease is released, and the release
      waits until ``revoked`` returns: the lane has finished the batch in hand
      and returned the rest to the broker, so the next owner starts exactly
      where this one stopped.
    - Calls come one at a time from the pool's task, never concurrently,
      except at shutdown, when every running partition is revoked at once.

    The listener promises that ``running()`` lists only partitions whose lane
    is still alive, with the fence it runs under: a lane that stopped by
    itself (fenced) drops out, and the pool takes the partition again.
    """

    def assigned(self, fence: Fence) -> None: ...

    async def revoked(self, partition: int) -> None: ...

    def running(self) -> dict[int, Fence]: ...
