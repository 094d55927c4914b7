"""Two figures the drains do not give: cost per command as the number of agents
grows, and get_budget latency under a steady stream of consumes.

Agents for the scaling figure are loaded in bulk with the database's own
driver (a million through the broker would take longer than the drain), with
the same columns the worker's ``register_agent`` and ``allocate`` write
(``bulk_load``, which the groups figure uses too).
"""

import asyncio
import contextlib
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

import aio_pika
import asyncpg

from token_budget.schemas import COMMANDS_EXCHANGE, CONTENT_TYPE

from .config import BenchConfig
from .infra import Database, RabbitAdmin
from .traffic import ALLOCATION, RpcClient, agent_names, consume_commands
from .workers import drain, prepare

__all__ = ["agents_scaling", "bulk_load", "rpc_under_stream"]


def _stamp() -> str:
    # The text SQLAlchemy's SQLite DATETIME stores.
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _load_sqlite(path: str, names: list[str], group_id: str | None) -> None:
    now = _stamp()
    conn = sqlite3.connect(path, timeout=60)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO agents (agent_id, created_at, group_id) VALUES (?, ?, ?)",
                ((name, now, group_id) for name in names),
            )
            conn.executemany(
                "INSERT INTO budgets (agent_id, allocated_tokens, used_tokens, reserved_tokens,"
                " ledger_seq, updated_at) VALUES (?, ?, 0, 0, 1, ?)",
                ((name, ALLOCATION, now) for name in names),
            )
    finally:
        conn.close()


async def _load_postgresql(dsn: str, names: list[str], group_id: str | None) -> None:
    now = datetime.now(UTC)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "agents",
                records=[(n, now, group_id) for n in names],
                columns=["agent_id", "created_at", "group_id"],
            )
            await conn.copy_records_to_table(
                "budgets",
                records=[(n, ALLOCATION, 0, 0, 1, now) for n in names],
                columns=[
                    "agent_id",
                    "allocated_tokens",
                    "used_tokens",
                    "reserved_tokens",
                    "ledger_seq",
                    "updated_at",
                ],
            )
    finally:
        await conn.close()


async def bulk_load(database: Database, names: list[str], group_id: str | None = None) -> None:
    """Register ``names`` (members of ``group_id``, which must exist) and allocate
    each ``ALLOCATION``, as ``register_agent`` and ``allocate`` would."""
    if database.kind == "sqlite":
        await asyncio.to_thread(_load_sqlite, database.dsn, names, group_id)
    else:
        await _load_postgresql(database.dsn, names, group_id)


async def agents_scaling(config: BenchConfig, admin: RabbitAdmin, kind: str) -> dict[str, Any]:
    """One process draining ``config.n`` consumes over few, then very many agents."""
    points: dict[str, Any] = {}
    for count in config.agent_counts:
        async with contextlib.AsyncExitStack() as stack:
            # Declared and migrated by a worker that registers nobody.
            prepared, setup = await prepare(stack, admin, config, kind, f"ag{kind[:2]}", [])
            await setup.stop()
            names = agent_names(count, "many")
            started = time.perf_counter()
            await bulk_load(prepared.database, names)
            loaded_s = time.perf_counter() - started
            prepared.agents = names
            result = await drain(prepared, processes=1, backlog=config.n, tag="s")
            points[str(count)] = {
                "agents": count,
                "load_s": round(loaded_s, 1),
                **{k: result[k] for k in ("msgs_per_s", "cpu_us_per_msg", "mean_batch")},
            }
    few, many = (points[str(c)] for c in config.agent_counts)
    return {
        "database": kind,
        "points": points,
        "cpu_ratio_many_few": _div(many["cpu_us_per_msg"], few["cpu_us_per_msg"]),
        "rate_ratio_few_many": _div(few["msgs_per_s"], many["msgs_per_s"]),
    }


async def rpc_under_stream(
    config: BenchConfig, admin: RabbitAdmin, capacity: float | None
) -> dict[str, Any]:
    """get_budget and the echo, alternating, while consumes arrive at a third of
    ``capacity`` (the one-process SQLite drain of this run, else 6,000/s)."""
    from .scenarios import _DRAIN_WAIT, _Samples, _start_echo

    rate = (capacity or 6000.0) / 3
    callers = agent_names(2, "srpc")
    agents = agent_names(config.agents)
    async with contextlib.AsyncExitStack() as stack:
        prepared, _ = await prepare(stack, admin, config, "sqlite", "str", agents + callers)
        await _start_echo(stack, prepared.amqp_url, config.partitions, prepared.workdir)
        client = await RpcClient.open(prepared.amqp_url)
        stack.push_async_callback(client.close)
        for _ in range(20):
            await client.echo(callers[0], within=_DRAIN_WAIT)
            await client.get_budget(callers[0], within=_DRAIN_WAIT)
        stop = asyncio.Event()
        stream = asyncio.create_task(_stream(prepared.amqp_url, agents, rate, stop))
        echo, worker_rpc = _Samples("echo, stream"), _Samples("get_budget, stream")
        try:
            for _ in range(config.rpc_calls):
                await echo.take(lambda: client.echo(callers[0], within=_DRAIN_WAIT))
                await worker_rpc.take(lambda: client.get_budget(callers[0], within=_DRAIN_WAIT))
        finally:
            stop.set()
            sent = await stream
    return {
        "database": "sqlite",
        "stream_rate_target": round(rate, 1),
        "stream_sent": sent,
        "echo": echo.summary(),
        "worker": worker_rpc.summary(),
        "p99_ratio": _div(worker_rpc.summary().get("p99_ms"), echo.summary().get("p99_ms")),
    }


async def _stream(amqp_url: str, agents: list[str], rate: float, stop: asyncio.Event) -> int:
    """Publish consumes at ``rate`` per second, in 50 ms slices, until ``stop``."""
    connection = await aio_pika.connect(amqp_url)
    sent = 0
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        started = time.perf_counter()
        while not stop.is_set():
            due = int((time.perf_counter() - started) * rate) - sent
            if due > 0:
                slice_ = consume_commands(agents, due, f"st{sent}")
                await asyncio.gather(
                    *(
                        exchange.publish(
                            aio_pika.Message(body, content_type=CONTENT_TYPE, message_id=mid),
                            routing_key=key,
                        )
                        for key, body, mid in slice_
                    )
                )
                sent += due
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await stop.wait()
    finally:
        await connection.close()
    return sent


def _div(top: Any, bottom: Any) -> float | None:
    if not top or not bottom:
        return None
    return round(float(top) / float(bottom), 3)
