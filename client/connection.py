"""What the SDK and the worker agree a lost connection looks like.

aio-pika's ``Connection.is_closed`` turns true only once ``close()`` was
called: after the broker closed the connection (a node shutting down, a
forced close) it stays false while every new channel fails. ``is_open``
looks at the transport instead. ``CONNECTION_ERRORS`` is the one tuple of
exceptions that mean "the broker or the connection, not our code, failed";
the SDK and the worker catch exactly these wherever they reconnect, retry
or give up on the broker. It is aio-pika's ``CONNECTION_EXCEPTIONS``
(``AMQPError``, ``ConnectionError``, ``OSError``, ``RuntimeError`` of a dead
channel, …), so that what aio-pika's own robust connection treats as lost,
we do too.
"""

from collections.abc import Generator
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

__all__ = ["CONNECTION_ERRORS", "Connecting", "is_open"]

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_EXCEPTIONS,
    # asyncio's timeouts (an OSError subclass on 3.11, named for the reader).
    TimeoutError,
)


def is_open(connection: AbstractConnection | None) -> bool:
    """True while ``connection`` can still open channels."""
    if connection is None or connection.is_closed:
        return False
    transport = connection.transport
    underlay = transport.connection if transport is not None else None
    return underlay is not None and not underlay.is_closed


class _Session(Protocol):
    async def __aenter__(self) -> Self: ...

    async def close(self) -> None: ...


S = TypeVar("S", bound=_Session)


class Connecting(Generic[S]):
    """What ``BudgetClient.connect`` returns: await it, or ``async with`` it."""

    def __init__(self, client: S) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, S]:
        return self._client.__aenter__().__await__()

    async def __aenter__(self) -> S:
        return await self._client.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client.close()
