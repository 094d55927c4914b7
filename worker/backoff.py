"""How every loop of the worker waits before trying again.

``pause`` sleeps until a timeout or until an event is set. It uses
``asyncio.timeout`` rather than ``asyncio.wait_for(event.wait(), …)``: on
Python 3.11 ``wait_for`` can swallow a cancellation when the event is already
set (CPython gh-86296), which once kept a worker's outbox loop spinning after
its connection died instead of letting the worker reconnect.
"""

import asyncio
from dataclasses import dataclass, field

__all__ = ["Backoff", "RetryPolicy", "pause"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How every retry loop of the worker backs off (``Settings.retry``).

    One policy for the lanes, the pool, the outbox, the sweeper, start-up and
    reconnects, so that one setting (``BUDGET_RETRY_INITIAL_SECONDS``,
    ``BUDGET_RETRY_MAX_SECONDS``) tunes them all.
    """

    initial: float
    maximum: float
    factor: float = 2.0

    def backoff(self) -> "Backoff":
        """A fresh sequence of delays, starting at ``initial``."""
        return Backoff(self.initial, self.maximum, self.factor)


@dataclass(slots=True)
class Backoff:
    """Exponential delays from ``initial`` up to ``maximum``; ``reset`` after a success."""

    initial: float
    maximum: float
    factor: float = 2.0
    _current: float = field(init=False)

    def __post_init__(self) -> None:
        self._current = self.initial

    def next(self) -> float:
        delay = self._current
        self._current = min(self._current * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        self._current = self.initial


async def pause(seconds: float, wake: asyncio.Event | None = None) -> bool:
    """Sleep ``seconds``, or less if ``wake`` is set; True if woken.

    Always yields to the event loop, so a cancellation of the caller lands.
    """
    if wake is None:
        await asyncio.sleep(seconds)
        return False
    if wake.is_set():
        await asyncio.sleep(0)
        return True
    try:
        async with asyncio.timeout(seconds):
            await wake.wait()
    except TimeoutError:
        return False
    return True
