"""The RPC baseline: a tiny aio-pika echo server in its own process.

``python -m bench.echo AMQP_URL QUEUE`` consumes a classic queue and answers
every request on its ``reply_to`` with the same body and correlation_id, then
acknowledges it. It prints ``ready`` once consuming and stops on SIGTERM.
Like the worker it runs in a process of its own, so the RPC comparison is
process to process.
"""

import asyncio
import signal
import sys

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, DeliveryMode

__all__ = ["serve"]


async def serve(amqp_url: str, queue_name: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=64)
        queue = await channel.declare_queue(queue_name, durable=False, auto_delete=True)
        exchange = channel.default_exchange

        async def on_message(message: AbstractIncomingMessage) -> None:
            if message.reply_to:
                reply = aio_pika.Message(
                    message.body,
                    content_type=message.content_type,
                    correlation_id=message.correlation_id,
                    delivery_mode=DeliveryMode.NOT_PERSISTENT,
                )
                # Not mandatory: on this non-confirming channel RabbitMQ 3.10
                # answered every mandatory publish to a direct reply-to address
                # with a NO_ROUTE return although it delivered it (seen here).
                await exchange.publish(reply, routing_key=message.reply_to, mandatory=False)
            await message.ack()

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
    asyncio.run(serve(sys.argv[1], sys.argv[2]))
