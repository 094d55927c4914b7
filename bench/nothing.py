"""The do-nothing consumer as a process of its own, like a worker.

``python -m bench.nothing AMQP_URL PREFETCH QUEUE...`` consumes each queue on
its own channel with ``PREFETCH``, acknowledges what has arrived with one
``multiple=True`` ack per batch (as the worker does), and does nothing else.
It prints ``ready T`` as it starts consuming, then ``count N T`` whenever its total
grew (at most every 50 ms), T being its own clock (``time.time()``), as the
worker's log lines carry theirs; it stops on SIGTERM.
"""

import asyncio
import signal
import sys
import time

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

__all__ = ["serve"]


class _Lane:
    def __init__(self) -> None:
        self.arrived: list[AbstractIncomingMessage] = []
        self.wake = asyncio.Event()
        self.acked = 0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self.arrived.append(message)
        self.wake.set()

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.arrived = self.arrived, []
            if batch:
                await max(batch, key=lambda m: m.delivery_tag or 0).ack(multiple=True)
                self.acked += len(batch)


async def serve(amqp_url: str, prefetch: int, queues: list[str]) -> None:
    connection = await aio_pika.connect(amqp_url)
    lanes = [_Lane() for _ in queues]
    tasks = [asyncio.create_task(lane.run()) for lane in lanes]
    try:
        ready = []
        for name in queues:
            channel = await connection.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            ready.append(await channel.get_queue(name, ensure=False))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        # The clock starts as the first lane starts, as the worker's does.
        print(f"ready {time.time()}", flush=True)
        for queue, lane in zip(ready, lanes, strict=True):
            await queue.consume(lane.on_message, no_ack=False)
        reported = 0
        while not stop.is_set():
            total = sum(lane.acked for lane in lanes)
            if total != reported:
                print(f"count {total} {time.time()}", flush=True)
                reported = total
            try:
                async with asyncio.timeout(0.05):
                    await stop.wait()
            except TimeoutError:
                pass
    finally:
        for task in tasks:
            task.cancel()
        await connection.close()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
