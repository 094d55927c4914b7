"""The baselines the worker is measured against, in the same run.

- The do-nothing consumer (``bench/nothing.py``): receives and acknowledges
  (``multiple=True``, one channel per lane, the worker's prefetch) and nothing
  else, in as many processes as the worker row it is compared with, each
  consuming its share of the worker's own quorum lanes. It is the broker's and
  aio-pika's limit here.
- The naive worker: what one would write first. An aio-pika callback per
  message with the worker's prefetch, one transaction (a conditional UPDATE)
  and one acknowledgement per message, on the same database as the worker row
  it is compared with, through the worker's own engine (SQLite WAL with
  ``synchronous=FULL``; PostgreSQL with ``synchronous_commit=on``). It keeps no
  ledger and no processed-command record, so it does less work than the real
  worker: a ratio against it is, if anything, conservative.
"""

import asyncio
import contextlib
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from sqlalchemy import bindparam, insert, update

from token_budget.schemas import parse_command
from token_budget.worker.store.db import create_engine
from token_budget.worker.store.migrate import upgrade
from token_budget.worker.store.tables import agents, budgets

from .config import BenchConfig
from .infra import RabbitAdmin, loadavg, new_database, new_tempdir, new_vhost
from .traffic import ALLOCATION, agent_names, consume_commands, declare, publish

__all__ = ["do_nothing", "naive"]

_ROOT = Path(__file__).resolve().parent.parent

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


def _drain_timeout(n: int, floor_rate: float) -> float:
    return max(60.0, n / floor_rate)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Nothing:
    """One do-nothing consumer process and the count it reports."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.count = 0
        #: The child's own clock (time.time()) when it began consuming, and
        #: when it last acknowledged.
        self.ready_at = 0.0
        self.last_at = 0.0
        self.cpu_at_ready = 0.0

    async def follow(self, changed: asyncio.Event) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            words = line.split()
            if words[:1] == [b"ready"]:
                self.ready_at, self.cpu_at_ready = float(words[1]), _cpu_seconds(self.proc.pid)
            elif words[:1] == [b"count"]:
                self.count, self.last_at = int(words[1]), float(words[2])
                changed.set()

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def do_nothing(config: BenchConfig, admin: RabbitAdmin, processes: int = 1) -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        url = await new_vhost(stack, admin, f"nothing{processes}")
        names = await declare(url, config.partitions, config.delivery_limit)
        publish_rate = await publish(
            url, consume_commands(agent_names(config.agents), config.n, "c")
        )
        changed = asyncio.Event()
        children: list[_Nothing] = []
        spawned = time.perf_counter()
        for index in range(processes):
            # Round robin, as the worker pool shares the lanes.
            share = names[index::processes]
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.nothing",
                url,
                str(config.prefetch),
                *share,
                cwd=_ROOT,
                stdout=asyncio.subprocess.PIPE,
            )
            child = _Nothing(proc)
            stack.push_async_callback(child.stop)
            children.append(child)
        followers = [asyncio.create_task(child.follow(changed)) for child in children]
        try:
            async with asyncio.timeout(_drain_timeout(config.n, 200)):
                while sum(c.count for c in children) < config.n:
                    changed.clear()
                    await changed.wait()
            finished = time.perf_counter()
            cpu = sum(_cpu_seconds(c.proc.pid) - c.cpu_at_ready for c in children)
        finally:
            for task in followers:
                task.cancel()
    # The processes' own clocks, as the worker rows' log timestamps.
    seconds = max(c.last_at for c in children) - min(c.ready_at for c in children)
    wall = finished - spawned
    return {
        "n": config.n,
        "processes": processes,
        "seconds": round(seconds, 4),
        "msgs_per_s": round(config.n / seconds, 1),
        "wall_s": round(wall, 4),
        "wall_msgs_per_s": round(config.n / wall, 1),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_msg": round(cpu / config.n * 1e6, 1),
        "prefetch": config.prefetch,
        "queues": len(names),
        "publish_msgs_per_s": round(publish_rate, 1),
        "loadavg": loadavg(),
    }


async def _consume_all(
    connection: AbstractConnection, names: list[str], prefetch: int, callbacks: list[Any]
) -> None:
    async def one(name: str, callback: Any) -> None:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(name, ensure=False)
        await queue.consume(callback, no_ack=False)

    await asyncio.gather(*map(one, names, callbacks))


async def naive(config: BenchConfig, admin: RabbitAdmin, kind: str = "sqlite") -> dict[str, Any]:
    async with contextlib.AsyncExitStack() as stack:
        url = await new_vhost(stack, admin, f"naive{kind[:2]}")
        database = await new_database(stack, kind, new_tempdir(stack, f"naive{kind[:2]}"))
        # Every prefetched message waits for a connection: let them queue.
        engine = create_engine(database.url, pool_timeout=3600)
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
        await publish(url, consume_commands(names_of_agents, config.naive_n, "c"))
        connection = await aio_pika.connect(url)
        stack.push_async_callback(connection.close)
        counter = _Counter(config.naive_n)
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
        await _consume_all(connection, names, config.prefetch, [on_message for _ in names])
        await asyncio.wait_for(counter.done.wait(), _drain_timeout(config.naive_n, 50))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "n": config.naive_n,
        "seconds": round(seconds, 4),
        "msgs_per_s": round(config.naive_n / seconds, 1),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_msg": round(cpu / config.naive_n * 1e6, 1),
        "prefetch": config.prefetch,
        "database": kind,
        "refused": refused,
        "loadavg": loadavg(),
    }
