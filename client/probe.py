"""Is any worker consuming the lanes? A passive declare of lane 0 says at once.

Without it, a request with no worker running waits for its whole timeout and
can only say "no reply". The lanes are single-active-consumer queues: the
declare-ok's consumer count is 0 when no worker consumes the lane, and the
queue is missing when no worker ever started on this vhost.
"""

import asyncio
import contextlib

import aiormq
from aio_pika.abc import AbstractConnection

from token_budget.schemas import Command, lane_queue_name

from .connection import CONNECTION_ERRORS, is_open
from .errors import NoWorker, RequestTimeout

__all__ = ["lane_consumers", "timeout_error"]

#: How long a probe after a timeout may add to it.
_PROBE_SECONDS = 2.0


async def lane_consumers(connection: AbstractConnection) -> int:
    """Consumers of the first lane queue; 0 if there is no such queue.

    A channel of its own: the broker closes the channel of a passive declare
    of a missing queue.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        queue = await channel.declare_queue(lane_queue_name(0), passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return 0
    finally:
        with contextlib.suppress(*CONNECTION_ERRORS):
            if not channel.is_closed:
                await channel.close()
    return int(queue.declaration_result.consumer_count or 0)


async def timeout_error(
    connection: AbstractConnection | None, command: Command, message_id: str | None, limit: float
) -> RequestTimeout:
    """The error for a request unanswered within ``limit`` seconds, saying what is known.

    A query changed nothing, so only a state change may or may not have been
    applied; and with no worker on the lanes, nobody was there to answer.
    """
    what = f"no reply to {command.command_type.value} for {command.key!r} within {limit}s"
    consumers = None
    if is_open(connection):
        assert connection is not None
        with contextlib.suppress(*CONNECTION_ERRORS):
            consumers = await asyncio.wait_for(lane_consumers(connection), _PROBE_SECONDS)
    if consumers == 0 and command.changes_state:
        return NoWorker(
            f"{what}: no worker is consuming the lanes. The command (message_id "
            f"{message_id}) waits in its lane and is applied once a worker starts: "
            "retry with the same message_id to get its reply"
        )
    if consumers == 0:
        return NoWorker(f"{what}: no worker is consuming the lanes: start one")
    if command.changes_state:
        return RequestTimeout(
            f"{what} (message_id {message_id}); it may or may not have been applied: "
            "retry with the same message_id"
        )
    return RequestTimeout(f"{what}: the worker is slow or its lane has a backlog; retry")
