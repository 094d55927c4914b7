"""The one way tests wait: poll a probe until it says done, or fail saying what."""

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["eventually"]

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T] | T],
    *,
    within: float,
    what: str,
    done: Callable[[T], bool] = bool,
    interval: float = 0.1,
) -> T:
    """Call ``probe`` until ``done(value)``; return that value.

    Raises ``AssertionError`` naming ``what`` and the last value seen once
    ``within`` seconds have passed: a timeout is a bound, never a measurement.
    """
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if done(value):  # type: ignore[arg-type]
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s (last: {value!r:.300})")
        await asyncio.sleep(interval)
