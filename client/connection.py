"""What the SDK and the worker agree a lost connection looks like.

aio-pika's ``Connection.is_closed`` turns true only once ``close()`` was
called: after the broker closed the connection (a node shutting down, a
forced close) it stays false while every new channel fails. ``is_open``
looks at the transport instead. ``CONNECTION_ERRORS`` is the one tuple of
exceptions that mean "the connection, not the request, failed"; every
reconnect path catches exactly these (aio-pika's ``CONNECTION_EXCEPTIONS``
is the model).
"""

import aiormq
from aio_pika.abc import AbstractConnection

__all__ = ["CONNECTION_ERRORS", "is_open"]

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    OSError,
    TimeoutError,
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
)


def is_open(connection: AbstractConnection | None) -> bool:
    """True while ``connection`` can still open channels."""
    if connection is None or connection.is_closed:
        return False
    transport = connection.transport
    underlay = transport.connection if transport is not None else None
    return underlay is not None and not underlay.is_closed
