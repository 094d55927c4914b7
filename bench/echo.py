"""The RPC baseline: an aio-pika echo server in a process of its own.

``python -m bench.echo AMQP_URL PARTITIONS`` declares the same path a
``get_budget`` takes: a fanout front exchange, an internal ``x-modulus-hash``
exchange, and PARTITIONS quorum queues with single-active-consumer, all with
the worker's own queue arguments (``bench.echo.*`` names). It consumes every
queue, answers each request on its ``reply_to`` with the same body and
correlation_id, then acknowledges it. It prints ``ready`` once consuming and
stops on SIGTERM. So the comparison is process to process and queue type to
queue type: what the worker adds on top is the worker.
"""

import asyncio
import signal
import sys

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, DeliveryMode

from token_budget.schemas import LANES_EXCHANGE_TYPE
from token_budget.worker.broker.topology import lane_arguments

__all__ = ["ECHO_EXCHANGE", "serve"]

ECHO_EXCHANGE = "bench.echo.commands"


async def serve(amqp_url: str, partitions: int) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        setup = await connection.channel(publisher_confirms=False)
        router = await setup.declare_exchange(
            "bench.echo.lanes", LANES_EXCHANGE_TYPE, durable=True, internal=True
        )
        names = [f"bench.echo.lane.{index:03d}" for index in range(partitions)]
        for name in names:
            queue = await setup.declare_queue(name, durable=True, arguments=lane_arguments(20))
            await queue.bind(router, routing_key="")
        front = await setup.declare_exchange(ECHO_EXCHANGE, "fanout", durable=True)
        await router.bind(front, routing_key="")
        for name in names:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=64)
            exchange = channel.default_exchange

            async def on_message(
                message: AbstractIncomingMessage, exchange: aio_pika.abc.AbstractExchange = exchange
            ) -> None:
                if message.reply_to:
                    reply = aio_pika.Message(
                        message.body,
                        content_type=message.content_type,
                        correlation_id=message.correlation_id,
                        delivery_mode=DeliveryMode.NOT_PERSISTENT,
                    )
                    # Not mandatory, as the worker's replies.
                    await exchange.publish(reply, routing_key=message.reply_to, mandatory=False)
                await message.ack()

            queue = await channel.get_queue(name, ensure=False)
            await queue.consume(on_message)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print("ready", flush=True)
        await stop.wait()
    finally:
        await connection.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
