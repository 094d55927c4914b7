"""The one way tests wait: poll a probe until it says done, or fail saying what.

Sync and async probes alike; the loop only ever sleeps with ``asyncio.sleep``,
so whatever runs in the test's event loop (an in-process worker, consumers)
keeps running while a test waits.
"""

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

__all__ = ["eventually"]

T = TypeVar("T")


@overload
async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    within: float,
    what: str,
    done: Callable[[T], object] = ...,
    interval: float = ...,
) -> T: ...


@overload
async def eventually(
    probe: Callable[[], T],
    *,
    within: float,
    what: str,
    done: Callable[[T], object] = ...,
    interval: float = ...,
) -> T: ...


async def eventually(
    probe: Callable[[], Any],
    *,
    within: float,
    what: str,
    done: Callable[[Any], object] = bool,
    interval: float = 0.1,
) -> Any:
    """Call ``probe`` (awaiting what it returns, if awaitable) until ``done(value)``
    holds, by default until the value is truthy; return that value.

    Raises ``AssertionError`` naming ``what`` and the last value seen once
    ``within`` seconds have passed: a timeout is a bound, never a measurement.
    """
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s (last: {value!r:.300})")
        await asyncio.sleep(interval)
