"""The pool: which partitions this worker should run, decided with its peers.

Every ``renew_interval`` the worker beats in the shared database, renews its
leases and reads the pool. Live workers, sorted by id, take partitions round
robin, so each runs floor(P/N) or ceil(P/N) of them and all agree without
talking. A partition moves by release (graceful: the lane finishes its batch
and returns the rest to the broker first) or by expiry (the owner died or
froze). The broker's single-active-consumer stays as the safety net, and the
lease epoch fences any commit a former owner still attempts.
"""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from structlog.typing import FilteringBoundLogger

from token_budget.worker.backoff import RetryPolicy, pause
from token_budget.worker.domain.outcomes import Fence
from token_budget.worker.errors import StorageUnavailable
from token_budget.worker.pool.listener import PartitionListener
from token_budget.worker.store.db import is_transient, retry_while_transient
from token_budget.worker.store.leases import Lease, LeaseStore, PoolView

__all__ = ["Pool", "assign"]


def assign(live: list[str], partitions: int, worker_id: str) -> set[int]:
    """The partitions ``worker_id`` should own among ``live`` workers (sorted)."""
    if worker_id not in live:
        return set()
    return {p for p in range(partitions) if live[p % len(live)] == worker_id}


class Pool:
    """This worker's share of the partitions, kept running through ``listener``.

    Promises: at most one live owner per partition at a time (leases with
    epochs, fenced commits), a lane revoked before its lease is released
    (``PartitionListener``), and every partition owned by some live worker
    within about ``lease_ttl`` of its owner's death.
    """

    def __init__(
        self,
        store: LeaseStore,
        listener: PartitionListener,
        *,
        renew_interval: float,
        retry: RetryPolicy,
        log: FilteringBoundLogger,
    ) -> None:
        self.store = store
        self._listener = listener
        self._interval = renew_interval
        self._retry = retry
        self._log = log.bind(worker_id=store.worker_id)
        self._stop = asyncio.Event()
        self.view: PoolView | None = None
        #: Set once the first rebalance is done: the worker's lanes are running.
        self.ticked = asyncio.Event()
        #: ``time.monotonic()`` of the last tick that renewed and rebalanced.
        self.last_tick: float | None = None
        self._evicted: set[str] = set()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Keep this worker's share of partitions running until stopped."""
        try:
            await self._until_stopped(self.store.ensure_partitions)
            while not self._stop.is_set():
                try:
                    view = await self.store.tick()
                    self.view = view
                    await self._rebalance(view)
                    self.last_tick = time.monotonic()
                    self.ticked.set()
                except Exception as error:
                    # Database away or a peer's lock in the way: lanes keep
                    # retrying their batches; leases stay ours unless another
                    # worker takes them meanwhile. Try again next tick.
                    if not isinstance(error, StorageUnavailable) and not is_transient(error):
                        raise
                    self._log.warning("pool_tick_failed", error=str(error)[:300])
                await pause(self._interval, self._stop)
        finally:
            await asyncio.gather(
                *(self._listener.revoked(p) for p in sorted(self._listener.running()))
            )
            with contextlib.suppress(Exception):
                await self.store.leave()
            self._log.info("pool_left")

    async def _rebalance(self, view: PoolView) -> None:
        me = self.store.worker_id
        target = assign(view.live, self.store.partitions, me)
        for partition, fence in sorted(self._listener.running().items()):
            lease = view.leases.get(partition)
            if lease is None or lease.owner != me or lease.epoch != fence.epoch:
                self._log.warning(
                    "partition_lost",
                    partition=partition,
                    reason="lease taken by another worker"
                    if lease and lease.owner
                    else "lease expired",
                    new_owner=lease.owner if lease else None,
                )
                await self._listener.revoked(partition)
            elif partition not in target:
                await self._listener.revoked(partition)
                await self.store.release(fence)
                self._log.info(
                    "partition_released",
                    partition=partition,
                    reason="rebalance",
                    live=len(view.live),
                )
        await self._evict_departed(view)
        running = self._listener.running()
        for partition in sorted(target - set(running)):
            lease = view.leases.get(partition)
            if lease is None:
                continue
            taken = await self._take(lease, view)
            if taken is not None:
                self._listener.assigned(taken)
                self._log.info(
                    "partition_taken",
                    partition=partition,
                    epoch=taken.epoch,
                    reason=_why(lease, me, view.now),
                    live=len(view.live),
                )

    async def _evict_departed(self, view: PoolView) -> None:
        live = set(view.live)
        for lease in view.leases.values():
            owner = lease.owner
            if owner is None or owner in live or owner in self._evicted:
                continue
            if lease.expires_at < view.now:
                self._evicted.add(owner)
                ended = await self.store.evict(owner)
                self._log.warning("worker_evicted", departed=owner, sessions_ended=ended)

    async def _take(self, lease: Lease, view: PoolView) -> Fence | None:
        me = self.store.worker_id
        if lease.owner == me and lease.expires_at > view.now:
            return Fence(lease.partition, me, lease.epoch)
        if lease.owner is None or lease.owner == me or lease.expires_at < view.now:
            return await self.store.acquire(lease)
        return None  # still held by its owner, who will release it soon

    async def _until_stopped(self, step: Callable[[], Awaitable[None]]) -> None:
        def warn(error: BaseException, delay: float) -> None:
            self._log.warning("pool_start_failed", error=str(error)[:300], retry_in_s=delay)

        await retry_while_transient(step, stop=self._stop, on_retry=warn, retry=self._retry)


def _why(lease: Lease, me: str, now: float) -> str:
    if lease.owner is None:
        return "free"
    if lease.owner == me:
        return "resumed"
    return f"expired lease of {lease.owner}"
