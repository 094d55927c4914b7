"""Kill the worker, stop the broker, stop the database: the books stay exact.

Every test checks final balances and each agent's ledger against an
independent model (tests/workload.py) and that reconcile finds nothing.
Outages use a RabbitMQ node and a PostgreSQL cluster of the test's own
(tests/private_services.py), so nothing else on the machine is disturbed.
"""

import asyncio
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from client import BudgetClient, BudgetClientError
from schemas import DEAD_LETTER_QUEUE, lane_queue_name
from tests.amqp_helpers import Amqp, open_amqp
from tests.db_helpers import balances, ledger_ids
from tests.private_services import PrivatePostgres, PrivateRabbit
from tests.processes import WorkerProcess
from tests.workload import Model, Step, make_workload
from worker.audit import reconcile
from worker.tables import ledger, processed_commands
from worker.views import read_only_engine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FAST_POOL = {"partitions": 4, "lease_ttl": 1.5, "member_ttl": 1.5, "renew_interval": 0.3}


async def processed(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).select_from(processed_commands)
        return int((await conn.execute(query)).scalar_one())


async def until(probe: Callable[[], object], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {limit}s")
        await asyncio.sleep(0.1)


async def publish_rounds(amqp: Amqp, rounds: list[list[Step]]) -> None:
    for round_ in rounds:  # confirms of a round before the next: per-agent order
        await amqp.publish_all((s.outgoing() for s in round_), window=len(round_))


async def assert_books(engine: AsyncEngine, model: Model) -> None:
    assert await balances(engine) == model.balances()
    assert await ledger_ids(engine) == {a: ids for a, ids in model.applied.items() if ids}
    assert await reconcile(engine) == []


async def test_twenty_kills_during_load_lose_and_double_nothing(
    worker_process: Callable[..., WorkerProcess], amqp_url: str, database_url: str
) -> None:
    rng = random.Random(7)
    rounds, model = make_workload(200, 110, seed=7, queries=False, prefix="crash")
    total = sum(len(r) for r in rounds)
    assert total >= 20_000
    kills = 0
    async with open_amqp(amqp_url) as amqp, read_only_engine(database_url) as engine:
        current = worker_process(**FAST_POOL)
        current.wait_ready()
        publisher = asyncio.create_task(publish_rounds(amqp, rounds))
        while kills < 20:
            await asyncio.to_thread(current.wait_ready)
            # Kill at a random point: after a random number of commands applied.
            target = await processed(engine) + rng.randint(150, 700)
            await until(lambda t=target: _reached(engine, t), 120, "progress before the kill")
            current.kill()
            kills += 1
            current = worker_process(**FAST_POOL)
        await publisher
        await until(lambda: _reached(engine, model.state_changing), 300, "everything applied")
        await assert_books(engine, model)
        assert await amqp.ready_count(DEAD_LETTER_QUEUE) == 0
    print(f"\nfault suite: {kills} SIGKILLs across {total} commands")


async def _reached(engine: AsyncEngine, count: int) -> bool:
    return await processed(engine) >= count


@pytest.fixture(scope="module")
def private_rabbit() -> Iterator[PrivateRabbit]:
    node = PrivateRabbit().start()
    yield node
    node.close()


async def test_broker_outage_loses_no_confirmed_consume(
    tmp_path: Path, database_url: str, private_rabbit: PrivateRabbit
) -> None:
    worker = WorkerProcess(
        tmp_path / "worker.log",
        amqp_url=private_rabbit.url,
        database_url=database_url,
        heartbeat=5,
        retry_max_seconds=0.5,
        **FAST_POOL,
    ).start()
    try:
        await asyncio.to_thread(worker.wait_ready)
        agents = [f"outage-{i}" for i in range(20)]
        confirmed: dict[str, int] = {}
        raised: dict[str, int] = {}
        async with BudgetClient.connect(private_rabbit.url, timeout=10) as client:
            for agent in agents:
                await client.register_agent(agent)
                await client.allocate(agent, 10**9)
            outage = asyncio.create_task(_outage(private_rabbit, after=0.5, length=3.0))
            index = 0
            while not outage.done() or index < 3000:
                agent, tokens = agents[index % len(agents)], 1 + index % 7
                message_id = f"o-{index}"
                try:
                    await client.consume(agent, tokens, message_id=message_id)
                    confirmed[message_id] = tokens
                except BudgetClientError:  # said so: never a silent loss
                    raised[message_id] = tokens
                    await asyncio.sleep(0.05)
                index += 1
            await outage
        assert raised, "the outage happened while publishing"
        # The worker came back by itself and consumes every lane again.
        await until(lambda: _ready_count(worker) >= 2, 60, "worker reconnected")
        await until(lambda: _every_lane_consumed(private_rabbit), 60, "every lane consumed")
        async with read_only_engine(database_url) as engine:
            await until(lambda: _applied_all(engine, confirmed), 120, "confirmed applied")
            applied = await _applied_tokens(engine)
            assert set(confirmed) <= set(applied)
            assert set(applied) <= set(confirmed) | set(raised)
            used = {a: u for a, (_, u) in (await balances(engine)).items()}
            expected = dict.fromkeys(agents, 0)
            for message_id, tokens in applied.items():
                expected[agents[int(message_id[2:]) % len(agents)]] += tokens
            assert used == expected
            assert await reconcile(engine) == []
        print(f"\nbroker outage: {len(confirmed)} confirmed, {len(raised)} raised")
    finally:
        worker.stop()


async def _outage(node: PrivateRabbit, *, after: float, length: float) -> None:
    await asyncio.sleep(after)
    await asyncio.to_thread(node.stop_app)
    await asyncio.sleep(length)
    await asyncio.to_thread(node.start_app)


def _ready_count(worker: WorkerProcess) -> int:
    return sum(1 for e in worker.events() if e.get("event") == "worker_ready")


def _every_lane_consumed(node: PrivateRabbit) -> bool:
    queues = node.queues()
    return all(queues.get(lane_queue_name(i), (0, 0))[1] == 1 for i in range(4))


async def _applied_tokens(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(ledger.c.message_id, ledger.c.amount).where(ledger.c.kind == "consume")
        )
        return {message_id: amount for message_id, amount in rows}


async def _applied_all(engine: AsyncEngine, confirmed: dict[str, int]) -> bool:
    return set(confirmed) <= set(await _applied_tokens(engine))


async def test_database_outage_holds_commands_and_resumes(
    tmp_path: Path, amqp_url: str
) -> None:
    postgres = PrivatePostgres().start()
    try:
        worker = WorkerProcess(
            tmp_path / "worker.log",
            amqp_url=amqp_url,
            database_url=postgres.url,
            retry_max_seconds=0.5,
            **FAST_POOL,
        ).start()
        await asyncio.to_thread(worker.wait_ready)
        rounds, model = make_workload(100, 40, seed=13, queries=False, prefix="dbout")
        async with open_amqp(amqp_url) as amqp:
            await publish_rounds(amqp, rounds[:15])
            async with read_only_engine(postgres.url) as engine:
                await until(lambda: _reached(engine, 1000), 60, "first commands applied")
            await asyncio.to_thread(postgres.stop)
            await publish_rounds(amqp, rounds[15:])
            await until(lambda: _storage_warnings(worker) >= 3, 60, "retries with backoff")
            check = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker", "--check",
                env={**worker.env}, stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await check.communicate()
            assert check.returncode == 1
            assert "database: unreachable" in out.decode()
            delays = [
                e["retry_in_s"] for e in worker.events() if e.get("event") == "storage_unavailable"
            ]
            assert max(delays) > min(delays)  # it backs off
            # Nothing good was dead-lettered; the lanes hold what is not applied.
            assert await amqp.ready_count(DEAD_LETTER_QUEUE) == 0
            await asyncio.to_thread(postgres.start)
            async with read_only_engine(postgres.url) as engine:
                await until(lambda: _reached(engine, model.state_changing), 120, "all applied")
                await assert_books(engine, model)
            assert await amqp.ready_count(DEAD_LETTER_QUEUE) == 0
        worker.stop()
    finally:
        postgres.close()


def _storage_warnings(worker: WorkerProcess) -> int:
    return sum(1 for e in worker.events() if e.get("event") == "storage_unavailable")
