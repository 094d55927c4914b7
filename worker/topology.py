"""Declare every exchange and queue the worker needs, idempotently."""

import contextlib
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from schemas import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    lane_queue_name,
)

__all__ = [
    "CONSISTENT_HASH",
    "PLUGIN_HINT",
    "PluginMissing",
    "TopologyError",
    "TopologySpec",
    "declare_topology",
    "lane_arguments",
]

CONSISTENT_HASH = "x-consistent-hash"
PLUGIN_HINT = (
    "RabbitMQ's consistent-hash exchange plugin is not enabled. Enable it on every "
    "broker node with:  rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"
)


class TopologyError(Exception):
    """The broker refused the topology; the worker cannot start."""


class PluginMissing(TopologyError):
    def __init__(self) -> None:
        super().__init__(PLUGIN_HINT)


@dataclass(frozen=True, slots=True)
class TopologySpec:
    partitions: int
    delivery_limit: int
    #: Only tests change this, to reproduce a missing plugin without disabling it.
    commands_exchange_type: str = CONSISTENT_HASH


def lane_arguments(delivery_limit: int) -> dict[str, aio_pika.abc.FieldValue]:
    return {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    }


async def declare_topology(connection: AbstractConnection, spec: TopologySpec) -> list[str]:
    """Declare exchanges, the dead-letter queue and the lanes; return lane names.

    Every declaration is idempotent, so workers starting together agree. A
    declaration that disagrees with what exists (other arguments) fails loudly:
    RabbitMQ never changes a queue's arguments in place.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        commands = await _declare_commands_exchange(channel, spec.commands_exchange_type)
        await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        dead = await channel.declare_exchange(
            DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead_queue = await channel.declare_queue(
            DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead_queue.bind(dead)
        await _check_lane_count(connection, spec.partitions)
        names = []
        for index in range(spec.partitions):
            name = lane_queue_name(index)
            queue = await channel.declare_queue(
                name, durable=True, arguments=lane_arguments(spec.delivery_limit)
            )
            # The binding key of a consistent-hash binding is its weight.
            await queue.bind(commands, routing_key="1")
            names.append(name)
        return names
    except aiormq.exceptions.ChannelPreconditionFailed as error:
        raise TopologyError(
            f"the broker holds a queue or exchange with other settings: {error}. "
            "Lane count and delivery limit are fixed for a deployment (docs/operations.md)."
        ) from error
    finally:
        # After a connection-level refusal the channel is already gone.
        with contextlib.suppress(Exception):
            await channel.close()


async def _queue_exists(connection: AbstractConnection, name: str) -> bool:
    # A passive declare of a missing queue closes its channel: use a spare one.
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_queue(name, passive=True)
        return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def _check_lane_count(connection: AbstractConnection, partitions: int) -> None:
    """Refuse to start with fewer lanes than the deployment has: the extra lanes
    would stay bound to the exchange with nobody consuming them. (More lanes
    than the deployment's is caught against the database, which knows the
    count without racing workers that are still declaring.)"""
    if await _queue_exists(connection, lane_queue_name(partitions)):
        raise TopologyError(
            f"lane {lane_queue_name(partitions)} exists: this deployment has more than "
            f"BUDGET_PARTITIONS={partitions} lanes (docs/operations.md)"
        )


async def _declare_commands_exchange(
    channel: AbstractChannel, exchange_type: str
) -> aio_pika.abc.AbstractExchange:
    try:
        return await channel.declare_exchange(COMMANDS_EXCHANGE, exchange_type, durable=True)
    except aiormq.exceptions.ConnectionCommandInvalid as error:
        if "exchange type" in str(error):
            raise PluginMissing() from error
        raise
