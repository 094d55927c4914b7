"""Worker pools: real processes share the partitions, fail over, and keep the books exact.

Each test runs against SQLite (processes on one host) and PostgreSQL, but
the frozen worker's, which needs a database server (PostgreSQL only).
"""

import asyncio
import json
import signal
from collections.abc import Callable

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.amqp_helpers import Amqp, Collector, open_amqp
from tests.db_helpers import balances, ledger_ids, reader
from tests.eventually import eventually
from tests.processes import WorkerProcess
from tests.workload import Model, Step, make_workload
from token_budget.schemas import LaneMap
from token_budget.worker.store.audit import reconcile
from token_budget.worker.store.leases import PoolView, pool_view
from token_budget.worker.store.tables import ledger, processed_commands

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

PARTITIONS = 8
POOL = {"partitions": PARTITIONS, "lease_ttl": 3, "member_ttl": 3, "renew_interval": 0.5}


async def _processed(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        query = select(func.count()).select_from(processed_commands)
        return int((await conn.execute(query)).scalar_one())


def _spread(view: PoolView) -> dict[str, int]:
    return {w: len(view.held_by(w)) for w in view.live}


def _even(view: PoolView, workers: int) -> bool:
    counts = _spread(view)
    return (
        len(counts) == workers
        and sum(counts.values()) == PARTITIONS
        and max(counts.values()) - min(counts.values()) <= 1
    )


async def _publish_rounds(
    amqp: Amqp, rounds: list[list[Step]], reply_to: str, after_round: Callable[[int], object]
) -> None:
    # Round r carries step r of every agent; awaiting its confirms before the
    # next round keeps each agent's commands in published order.
    for index, round_ in enumerate(rounds):
        await amqp.publish_all((step.outgoing(reply_to) for step in round_), window=len(round_))
        result = after_round(index)
        if asyncio.iscoroutine(result):
            await result


async def _check_books(
    engine: AsyncEngine, model: Model, replies: Collector, touched: set[int]
) -> None:
    """Books exact; every query answered as the in-order model says.

    On the lanes in ``touched`` (a killed worker's) a query may have been
    redelivered after its first answer and answered again from a later state;
    on every other lane each answer is exactly the state at its place.
    """
    assert await balances(engine) == model.balances()
    # Stored history, not logs: each agent's ledger lists its applied commands
    # exactly once each, in the order they were published.
    assert await ledger_ids(engine) == {a: ids for a, ids in model.applied.items() if ids}
    assert await reconcile(engine) == []
    lanes = LaneMap(PARTITIONS)
    answered = set()
    for message in replies.messages:
        body = json.loads(message.body)
        query = message.correlation_id or ""
        seen = (body["allocated_tokens"], body["used_tokens"])
        if lanes.index_of(query.rsplit("-", 1)[0]) in touched:
            assert seen in model.possible_answers(query), (query, seen, model.seen[query])
        else:
            assert seen == model.seen[query], (query, seen)
        answered.add(query)
    assert answered == set(model.seen)  # every query answered


async def test_pool_survives_a_killed_worker_with_exact_books(
    worker_process: Callable[..., WorkerProcess], amqp_url: str, database_url: str
) -> None:
    rounds, model = make_workload(500, 62, seed=3)  # 31,000 commands
    workers = [worker_process(**POOL) for _ in range(3)]
    killed = (await workers[0].wait_ready())["worker_id"]
    for process in workers[1:]:
        await process.wait_ready()
    async with reader(database_url) as engine, open_amqp(amqp_url) as amqp:
        view = await eventually(
            lambda: pool_view(engine, 3),
            within=60,
            what="even spread of 3",
            done=lambda v: _even(v, 3),
        )
        reply_to, replies = await amqp.reply_queue()
        touched: set[int] = set()

        async def kill_and_replace(index: int) -> None:
            if index == 20:
                touched.update((await pool_view(engine, 3)).held_by(killed))
                workers[0].kill()
                workers.append(worker_process(**POOL))

        await _publish_rounds(amqp, rounds, reply_to, kill_and_replace)
        await eventually(
            lambda: _processed(engine),
            within=180,
            what="all applied",
            done=lambda n: n >= model.state_changing,
        )
        view = await eventually(
            lambda: pool_view(engine, 3),
            within=60,
            what="even spread after kill",
            done=lambda v: _even(v, 3),
        )
        assert workers[0].proc is not None and workers[0].proc.returncode == -signal.SIGKILL
        assert set(view.live) == {
            next(e["worker_id"] for e in w.events() if e.get("event") == "worker_ready")
            for w in workers[1:]
        }
        assert touched and len(touched) < PARTITIONS
        await _check_books(engine, model, replies, touched)


@pytest.mark.postgresql_only(
    reason="SQLite has no server to end a frozen process's transaction: a worker frozen "
    "inside one holds the write lock, and so the whole pool, until it wakes "
    "(docs/pool.md); the fencing itself is the same code on both databases"
)
async def test_paused_worker_commits_nothing_for_partitions_it_lost(
    worker_process: Callable[..., WorkerProcess], amqp_url: str, database_url: str
) -> None:
    rounds, model = make_workload(200, 40, seed=5, queries=False, prefix="paused")
    # A keeps its broker connection through the pause (long heartbeat), so
    # when it wakes it still holds deliveries and tries to apply them.
    frozen = worker_process(**POOL, heartbeat=120)
    frozen_id = (await frozen.wait_ready())["worker_id"]
    other = worker_process(**POOL)
    other_id = (await other.wait_ready())["worker_id"]
    async with reader(database_url) as engine, open_amqp(amqp_url) as amqp:
        await eventually(
            lambda: pool_view(engine, 3), within=60, what="even spread", done=lambda v: _even(v, 2)
        )
        reply_to, _ = await amqp.reply_queue()
        lost_epochs: dict[int, int] = {}

        async def pause(index: int) -> None:
            if index != 10:
                return
            frozen.signal(signal.SIGSTOP)
            try:
                view = await eventually(
                    lambda: pool_view(engine, 3),
                    within=60,
                    what="takeover of the frozen worker's partitions",
                    done=lambda v: len(v.held_by(other_id)) == PARTITIONS,
                )
                lost_epochs.update({p: lease.epoch for p, lease in view.leases.items()})
            finally:
                frozen.signal(signal.SIGCONT)

        await _publish_rounds(amqp, rounds, reply_to, pause)
        await eventually(
            lambda: _processed(engine),
            within=180,
            what="all applied",
            done=lambda n: n >= model.state_changing,
        )
        assert await balances(engine) == model.balances()
        assert await ledger_ids(engine) == {a: ids for a, ids in model.applied.items() if ids}
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        ledger.c.agent_id,
                        ledger.c.worker_id,
                        ledger.c.lease_partition,
                        ledger.c.lease_epoch,
                    ).order_by(ledger.c.agent_id, ledger.c.seq)
                )
            ).all()
        # Along each agent's history the lease epoch never goes back: nothing
        # was committed under a lease after a newer one had committed.
        last: dict[str, int] = {}
        for agent, _, _, epoch in rows:
            assert epoch >= last.get(agent, 0), agent
            last[agent] = epoch
        taken_over = {p for _, w, p, e in rows if w == other_id and e >= lost_epochs[p]}
        frozen_before = {p for _, w, p, e in rows if w == frozen_id and e < lost_epochs[p]}
        assert taken_over & frozen_before  # the frozen worker's partitions moved mid-stream
        assert await reconcile(engine) == []
    woke = [e["event"] for e in frozen.events()]
    assert "partition_lost" in woke or "lane_fenced" in woke


async def test_a_lane_handed_over_mid_drain_answers_every_query_exactly(
    worker_process: Callable[..., WorkerProcess], amqp_url: str, database_url: str
) -> None:
    rounds, model = make_workload(200, 40, seed=8, prefix="handover")
    async with reader(database_url) as engine, open_amqp(amqp_url) as amqp:
        reply_to, replies = await amqp.reply_queue()
        # Small batches, so the backlog takes the first worker many of them.
        first = worker_process(**POOL, batch_max=8, prefetch=32)
        first_id = (await first.wait_ready())["worker_id"]
        await _publish_rounds(amqp, rounds, reply_to, lambda _: None)
        await eventually(
            lambda: _processed(engine),
            within=60,
            what="draining under way",
            done=lambda n: n >= 600,
        )
        # A second worker joins: the first hands half its lanes over gracefully,
        # each after the batch in hand, while the backlog still drains.
        second = worker_process(**POOL)
        second_id = (await second.wait_ready())["worker_id"]
        await eventually(
            lambda: _processed(engine),
            within=180,
            what="all applied",
            done=lambda n: n >= model.state_changing,
        )
        await eventually(
            lambda: {m.correlation_id for m in replies.messages} >= set(model.seen),
            within=60,
            what="an answer to every query",
        )
        # A graceful handover leaves nothing to redeliver: every answer is exact.
        await _check_books(engine, model, replies, touched=set())
        async with engine.connect() as conn:
            by = (await conn.execute(select(ledger.c.worker_id, ledger.c.lease_partition))).all()
    moved = {p for w, p in by if w == first_id} & {p for w, p in by if w == second_id}
    assert moved, "a lane changed hands with its agents' commands on both sides"
    released = [e for e in first.events() if e.get("event") == "partition_released"]
    assert released and all(e["reason"] == "rebalance" for e in released)
