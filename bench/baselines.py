"""The two baselines the worker is measured against, in the same run.

- The do-nothing consumer: receives and acknowledges (``multiple=True``, one
  channel per lane, the worker's prefetch) and nothing else. Draining the
  worker's own quorum lanes, it is the broker's and aio-pika's limit here.
- The naive worker: what one would write first. One message per lane at a
  time, one transaction (a conditional UPDATE) and one acknowledgement per
  message, SQLite with the worker's own engine (WAL, ``synchronous=FULL``).
  It keeps no ledger and no processed-command record, so it does less work
  than the real worker: a ratio against it is, if anything, conservative.
"""

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from sqlalchemy import bindparam, insert, update

from schemas import parse_command
from worker.db import create_engine
from worker.migrate import upgrade
from worker.tables import agents, budgets

from .config import BenchConfig
from .infra import RabbitAdmin, loadavg, new_database, new_tempdir, new_vhost
from .traffic import ALLOCATION, agent_names, consume_commands, declare, publish

__all__ = ["do_nothing", "naive"]

_consume = (
    update(budgets)
    .where(budgets.c.agent_id == bindparam("agent"))
    .where(budgets.c.used_tokens + bindparam("n") <= budgets.c.allocated_tokens)
    .values(used_tokens=budgets.c.used_tokens + bindparam("n"))
)


class _Counter:
    """Counts finished messages; sets ``done`` at ``target``."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.count = 0
        self.done = asyncio.Event()

    def add(self, count: int) -> None:
        self.count += count
        if self.count >= self.target:
            self.done.set()


class _AckLane:
    """One lane of the do-nothing consumer: batch whatever arrived, ack the last."""

    def __init__(self, counter: _Counter) -> None:
        self._counter = counter
        self._arrived: list[AbstractIncomingMessage] = []
        self._wake = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        self._arrived.append(message)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._arrived = self._arrived, []
            if not batch:
                continue
            last = max(batch, key=lambda message: message.delivery_tag or 0)
            await last.ack(multiple=True)
            self._counter.add(len(batch))


def _drain_timeout(n: int, floor_rate: float) -> float:
    return max(60.0, n / floor_rate)


async def _consume_all(
    connection: AbstractConnection, names: list[str], prefetch: int, callbacks: list[Any]
) -> None:
    async def one(name: str, callback: Any) -> None:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(name, ensure=False)
        await queue.consume(callback, no_ack=False)

    await asyncio.gather(*map(one, names, callbacks))


async def do_nothing(config: BenchConfig, admin: RabbitAdmin) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        url = await new_vhost(stack, admin, "nothing")
        names = await declare(url, config.partitions, config.delivery_limit)
        publish_rate = await publish(
            url, consume_commands(agent_names(config.agents), config.n, "c")
        )
        connection = await aio_pika.connect(url)
        stack.push_async_callback(connection.close)
        counter = _Counter(config.n)
        lanes = [_AckLane(counter) for _ in names]
        started, cpu = time.perf_counter(), time.process_time()
        tasks = [asyncio.create_task(lane.run()) for lane in lanes]
        try:
            await _consume_all(
                connection, names, config.prefetch, [lane.on_message for lane in lanes]
            )
            await asyncio.wait_for(counter.done.wait(), _drain_timeout(config.n, 200))
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "n": config.n,
        "seconds": round(seconds, 4),
        "msgs_per_s": round(config.n / seconds, 1),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_msg": round(cpu / config.n * 1e6, 1),
        "prefetch": config.prefetch,
        "queues": len(names),
        "publish_msgs_per_s": round(publish_rate, 1),
        "loadavg": loadavg(),
    }


async def naive(config: BenchConfig, admin: RabbitAdmin) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        url = await new_vhost(stack, admin, "naive")
        database = await new_database(stack, "sqlite", new_tempdir(stack, "naive"))
        engine = create_engine(database.url)
        stack.push_async_callback(engine.dispose)
        await upgrade(engine)
        names_of_agents = agent_names(config.agents)
        now = datetime.now(UTC)
        async with engine.begin() as conn:
            await conn.execute(
                insert(agents), [{"agent_id": a, "created_at": now} for a in names_of_agents]
            )
            await conn.execute(
                insert(budgets),
                [
                    {
                        "agent_id": a,
                        "allocated_tokens": ALLOCATION,
                        "used_tokens": 0,
                        "ledger_seq": 1,
                        "updated_at": now,
                    }
                    for a in names_of_agents
                ],
            )
        names = await declare(url, config.partitions, config.delivery_limit)
        await publish(url, consume_commands(names_of_agents, config.n, "c"))
        connection = await aio_pika.connect(url)
        stack.push_async_callback(connection.close)
        counter = _Counter(config.n)
        refused = 0

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal refused
            command = parse_command(message.body)
            async with engine.begin() as conn:
                result = await conn.execute(
                    _consume, {"agent": command.agent_id, "n": getattr(command, "tokens", 0)}
                )
            refused += result.rowcount != 1
            await message.ack()
            counter.add(1)

        started, cpu = time.perf_counter(), time.process_time()
        await _consume_all(connection, names, config.naive_prefetch, [on_message for _ in names])
        await asyncio.wait_for(counter.done.wait(), _drain_timeout(config.n, 50))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "n": config.n,
        "seconds": round(seconds, 4),
        "msgs_per_s": round(config.n / seconds, 1),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_msg": round(cpu / config.n * 1e6, 1),
        "prefetch": config.naive_prefetch,
        "database": "sqlite (WAL, synchronous=FULL)",
        "refused": refused,
        "loadavg": loadavg(),
    }
