"""Declare every exchange and queue the worker needs, idempotently.

Producers publish to ``budget.commands``, a fanout exchange whose one binding
leads to ``budget.lanes``, an internal ``x-modulus-hash`` exchange. That one
routes a routing key to a lane by ``phash2(key) mod N`` over the lanes sorted
by name: a pure function of the key and the set of lanes (schemas/lanes.py),
so an agent stays on its lane across broker and node restarts. The front
exchange is declared last, after every lane is bound, so that no producer can
ever publish while only some lanes are bound (which would route over fewer).

Deployments of earlier versions ran an ``x-consistent-hash`` ``budget.commands``,
whose ring moves keys when a node boots; the worker finds it here, unbinds
its lanes so that nothing more arrives by it, and drains them before the
switch (worker/tasks/upgrade.py, docs/operations.md).
"""

import contextlib
from dataclasses import dataclass
from enum import StrEnum

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

from token_budget.schemas import (
    COMMANDS_EXCHANGE,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    EVENTS_EXCHANGE,
    LANES_EXCHANGE,
    LANES_EXCHANGE_TYPE,
    QUERIES_QUEUE,
    lane_queue_name,
)
from token_budget.worker.errors import PLUGIN_HINT, PluginMissing, TopologyError

__all__ = [
    "LEGACY_EXCHANGE_TYPE",
    "PLUGIN_HINT",
    "PluginMissing",
    "Routing",
    "Topology",
    "TopologyError",
    "TopologySpec",
    "broker_version",
    "declare_topology",
    "lane_arguments",
    "queries_arguments",
    "routing_is_stable_on",
    "switch_routing",
]

#: The exchange type of deployments before stable routing (contract 1.1).
LEGACY_EXCHANGE_TYPE = "x-consistent-hash"


class Routing(StrEnum):
    """How ``budget.commands`` routes, as the worker found it."""

    #: The front exchange feeds ``budget.lanes``: an agent's lane never moves.
    STABLE = "stable"
    #: The legacy ``x-consistent-hash`` exchange: its lanes are unbound so that
    #: nothing more arrives by it, and are drained before the switch.
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class TopologySpec:
    """The deployment's shape: lane count and delivery limit, fixed for its life."""

    partitions: int
    delivery_limit: int
    #: Only tests change this, to reproduce a missing plugin without disabling it.
    router_exchange_type: str = LANES_EXCHANGE_TYPE


@dataclass(frozen=True, slots=True)
class Topology:
    """What ``declare_topology`` found and made: the lane queues, by index."""

    lanes: tuple[str, ...]
    routing: Routing


def broker_version(connection: AbstractConnection) -> str:
    """The RabbitMQ version the broker announced when the connection opened."""
    transport = connection.transport
    properties = getattr(transport and transport.connection, "server_properties", None) or {}
    version = properties.get("version", "")
    return version.decode() if isinstance(version, bytes) else str(version)


def routing_is_stable_on(version: str) -> bool:
    """False for RabbitMQ 4.2, whose Khepri metadata store lists an exchange's
    destinations in no stable order, so ``x-modulus-hash`` may move keys on a
    restart (fixed in 4.3, rabbitmq-server #15849). Unknown versions pass."""
    parts = version.split(".")
    return parts[:2] != ["4", "2"]


def lane_arguments(delivery_limit: int) -> dict[str, aio_pika.abc.FieldValue]:
    return {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    }


def queries_arguments(delivery_limit: int) -> dict[str, aio_pika.abc.FieldValue]:
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    }


async def declare_topology(connection: AbstractConnection, spec: TopologySpec) -> Topology:
    """Declare exchanges, the dead-letter queue and the lanes.

    Every declaration is idempotent, so workers starting together agree. A
    declaration that disagrees with what exists (other arguments) fails loudly:
    RabbitMQ never changes a queue's arguments in place. A legacy
    consistent-hash ``budget.commands`` is kept, with every lane unbound from
    it, and reported as ``Routing.DRAINING``.
    """
    routing = Routing.DRAINING if await _is_legacy(connection) else Routing.STABLE
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        dead = await channel.declare_exchange(
            DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead_queue = await channel.declare_queue(
            DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead_queue.bind(dead)
        # Committed queries: every worker consumes it (no single active consumer).
        await channel.declare_queue(
            QUERIES_QUEUE, durable=True, arguments=queries_arguments(spec.delivery_limit)
        )
        await _check_lane_count(connection, spec.partitions)
        lanes = [
            await channel.declare_queue(
                lane_queue_name(index), durable=True, arguments=lane_arguments(spec.delivery_limit)
            )
            for index in range(spec.partitions)
        ]
        router = await _declare_router(channel, spec.router_exchange_type)
        for queue in lanes:
            # The router ignores binding keys; only the set of lanes counts.
            await queue.bind(router, routing_key="")
        if routing is Routing.STABLE:
            front = await channel.declare_exchange(
                COMMANDS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
            )
            await router.bind(front, routing_key="")
        else:
            legacy = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
            for queue in lanes:
                # Its binding key was the consistent-hash weight. Unbinding is
                # idempotent: a binding already gone is no error.
                await queue.unbind(legacy, routing_key="1")
        return Topology(tuple(queue.name for queue in lanes), routing)
    except aiormq.exceptions.ChannelPreconditionFailed as error:
        raise TopologyError(
            f"the broker holds a queue or exchange with other settings: {error}. "
            "Lane count and delivery limit are fixed for a deployment (docs/operations.md)."
        ) from error
    finally:
        # After a connection-level refusal the channel is already gone.
        with contextlib.suppress(Exception):
            await channel.close()


async def switch_routing(connection: AbstractConnection, spec: TopologySpec) -> None:
    """Replace a drained legacy ``budget.commands`` by the stable front exchange.

    Between the delete and the declare a publish to ``budget.commands`` fails
    with NOT_FOUND, and until the new exchange is bound to ``budget.lanes`` a
    mandatory publish comes back unroutable (the SDK raises ``NotDelivered``
    for both; retrying is safe; a publish without ``mandatory`` is lost). Run it
    only once every lane is drained: commands the old ring routed must not
    meet the same agents' commands routed by the new one.
    """
    if await _is_legacy(connection):
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.exchange_delete(COMMANDS_EXCHANGE)
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
    topology = await declare_topology(connection, spec)
    if topology.routing is not Routing.STABLE:  # pragma: no cover - a racing old worker
        raise TopologyError(f"{COMMANDS_EXCHANGE} is still {LEGACY_EXCHANGE_TYPE}")


async def _is_legacy(connection: AbstractConnection) -> bool:
    """True if ``budget.commands`` exists with the legacy consistent-hash type.

    AMQP cannot read an exchange's type: a passive declare says whether it
    exists, and a declaration with another type is refused (406) naming both.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_exchange(
            COMMANDS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True, passive=True
        )
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False  # a new deployment
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_exchange(
            COMMANDS_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True
        )
        return False
    except aiormq.exceptions.ChannelPreconditionFailed as error:
        if LEGACY_EXCHANGE_TYPE in str(error):
            return True
        raise TopologyError(
            f"{COMMANDS_EXCHANGE} exists with another type: {error} (docs/operations.md)"
        ) from error
    finally:
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


async def _declare_router(
    channel: AbstractChannel, exchange_type: str
) -> aio_pika.abc.AbstractExchange:
    try:
        # Internal: producers cannot publish to it, only through the front.
        return await channel.declare_exchange(
            LANES_EXCHANGE, exchange_type, durable=True, internal=True
        )
    except aiormq.exceptions.ConnectionCommandInvalid as error:
        if "exchange type" in str(error):
            raise PluginMissing() from error
        raise
