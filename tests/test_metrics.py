"""``BUDGET_METRICS_PORT``: /metrics agrees exactly with what the worker did,
/healthz says whether it can work. Real worker processes, scraped over HTTP."""

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from tests.amqp_helpers import Outgoing, command, open_amqp, setup_agent
from tests.db_helpers import install_poison_trigger, lane_blocked, reader
from tests.eventually import eventually
from tests.private_services import PrivatePostgres, free_port
from tests.processes import WorkerProcess
from token_budget.schemas import DEAD_LETTER_QUEUE
from token_budget.worker.metrics import NAMES
from token_budget.worker.store.db import create_engine
from token_budget.worker.store.tables import ledger, processed_commands

pytestmark = pytest.mark.timeout(180)

AGENTS = [f"m-{n}" for n in range(5)]


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name, each with its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def commands(port: int) -> dict[tuple[str, str], int]:
    found = scrape(port).get("budget_commands_total", [])
    return {(labels["type"], labels["outcome"]): int(value) for labels, value in found}


async def publish_workload(amqp_url: str) -> int:
    """Every outcome a lane can reach without authorization; how many deliveries."""
    async with open_amqp(amqp_url) as amqp:
        reply_to, _ = await amqp.reply_queue()

        def one(body: bytes, agent: str, message_id: str | None) -> Outgoing:
            return Outgoing(body, agent, message_id=message_id, reply_to=reply_to)

        rounds: list[list[Outgoing]] = [
            [one(command("register_agent", a), a, f"{a}:r") for a in AGENTS],
            [one(command("allocate", a, 100), a, f"{a}:a") for a in AGENTS],
        ]
        # 30 four times in 100: three applied, the fourth refused.
        rounds += [
            [one(command("consume", a, 30), a, f"{a}:c{i}") for a in AGENTS] for i in range(4)
        ]
        rounds.append([one(command("consume", a, 30), a, f"{a}:c0") for a in AGENTS])  # retries
        rounds.append(
            [
                one(command("consume", AGENTS[0], 1), AGENTS[0], f"{AGENTS[0]}:c1"),  # conflict
                one(command("get_budget", "nobody"), "nobody", None),  # query_refused
                one(b"{not json", AGENTS[1], "broken"),  # invalid: dead-lettered
                *(one(command("get_budget", a), a, None) for a in AGENTS),
            ]
        )
        for round_ in rounds:
            await amqp.publish_all(round_)
        return sum(len(r) for r in rounds)


async def counted_once_settled(port: int, sent: int) -> dict[tuple[str, str], int]:
    """The command counters once they account for ``sent`` deliveries."""
    return await eventually(
        lambda: commands(port),
        within=60,
        what="every delivery counted",
        done=lambda c: sum(c.values()) >= sent,
    )


EXPECTED = {
    ("register_agent", "applied"): 5,
    ("allocate", "applied"): 5,
    ("consume", "applied"): 15,
    ("consume", "refused"): 5,
    ("consume", "duplicate"): 5,
    ("consume", "conflict"): 1,
    ("get_budget", "query_refused"): 1,
    ("get_budget", "query"): 5,
    ("unknown", "invalid"): 1,
}


async def test_the_command_counters_agree_exactly_with_the_books(
    worker_process: Callable[..., WorkerProcess], amqp_url: str, database_url: str
) -> None:
    port = free_port()
    worker = worker_process(metrics_port=port)
    await worker.wait_ready()
    sent = await publish_workload(amqp_url)
    assert await counted_once_settled(port, sent) == EXPECTED
    samples = scrape(port)
    assert samples["budget_dead_letters_total"] == [({"code": "invalid_command"}, 1.0)]
    assert samples["budget_batch_size_sum"][0][1] == sent
    async with open_amqp(amqp_url) as amqp:
        assert await amqp.ready_count(DEAD_LETTER_QUEUE) == 1
    async with reader(database_url) as engine, engine.connect() as conn:
        consumes = select(func.count()).select_from(ledger).where(ledger.c.kind == "consume")
        assert (await conn.execute(consumes)).scalar_one() == EXPECTED[("consume", "applied")]
        stored = (await conn.execute(select(func.count()).select_from(processed_commands))).scalar()
        # Every state-changing first delivery has its outcome stored, refusals included.
        assert stored == 5 + 5 + 15 + 5


async def test_every_exported_family_is_documented_in_the_metrics_module(
    worker_process: Callable[..., WorkerProcess],
) -> None:
    port = free_port()
    worker = worker_process(metrics_port=port)
    await worker.wait_ready()
    names = {
        name.removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
        for name in scrape(port)
        if name.startswith("budget_") and not name.endswith("_created")
    }
    # Labelled counters appear with their first sample: the rest must be there.
    assert NAMES - {"budget_commands_total", "budget_dead_letters_total"} <= names <= NAMES


async def test_healthz_turns_503_while_the_database_is_away_and_200_once_back(
    tmp_path: Path, amqp_url: str
) -> None:
    postgres = PrivatePostgres().start()
    port = free_port()
    # Trust authentication takes any password: this one must never be shown.
    url = postgres.url.replace("postgres@", "postgres:hunter2-secret@")
    worker = WorkerProcess(
        tmp_path / "worker.log",
        amqp_url=amqp_url,
        database_url=url,
        partitions=4,
        metrics_port=port,
        health_interval=0.5,
        retry_max_seconds=0.5,
    ).start()
    try:
        await worker.wait_ready()
        await eventually(
            lambda: health(port), within=30, what="healthy", done=lambda h: h[0] == 200
        )
        await asyncio.to_thread(postgres.stop)
        _, body = await eventually(
            lambda: health(port), within=60, what="unhealthy", done=lambda h: h[0] == 503
        )
        assert body["status"] == "unavailable"
        assert body["database"] != "ok" and "database" in body["reason"]
        scraped = await asyncio.to_thread(scrape, port)
        assert "hunter2" not in repr(scraped) and "hunter2" not in json.dumps(body)
        assert scraped["budget_worker_healthy"] == [({}, 0.0)]
        await asyncio.to_thread(postgres.start)
        await eventually(lambda: health(port), within=60, what="back", done=lambda h: h[0] == 200)
    finally:
        worker.stop()
        postgres.close()


async def test_a_parent_of_two_processes_serves_their_sum(
    worker_process: Callable[..., WorkerProcess], amqp_url: str
) -> None:
    port = free_port()
    worker = worker_process(metrics_port=port, processes=2)
    await worker.wait_ready()
    _, body = await eventually(
        lambda: health(port), within=60, what="both children healthy", done=lambda h: h[0] == 200
    )
    assert len(body["healthy_pids"]) == 2
    sent = await publish_workload(amqp_url)
    assert await counted_once_settled(port, sent) == EXPECTED
    # Each child holds its share; the parent sums them.
    await eventually(
        lambda: scrape(port)["budget_partitions_held"],
        within=30,
        what="every partition held once",
        done=lambda held: held == [({}, 4.0)],
    )


async def test_a_child_killed_after_its_work_leaves_its_counts_in_the_parents_sum(
    worker_process: Callable[..., WorkerProcess], amqp_url: str
) -> None:
    port = free_port()
    worker = worker_process(metrics_port=port, processes=2)
    await worker.wait_ready()
    _, body = await eventually(
        lambda: health(port), within=60, what="both children healthy", done=lambda h: h[0] == 200
    )
    sent = await publish_workload(amqp_url)
    assert await counted_once_settled(port, sent) == EXPECTED
    killed = body["healthy_pids"][0]
    os.kill(int(killed), signal.SIGKILL)
    # The parent starts another child; the dead one's counters stay in the sum.
    await eventually(
        lambda: health(port),
        within=60,
        what="a new child healthy in its place",
        done=lambda h: h[0] == 200 and killed not in h[1]["healthy_pids"],
    )
    assert commands(port) == EXPECTED


async def test_a_lane_that_cannot_commit_shows_its_unapplied_deliveries(
    worker_process: Callable[..., WorkerProcess], amqp_url: str, database_url: str
) -> None:
    port = free_port()
    worker = worker_process(metrics_port=port, partitions=1)
    await worker.wait_ready()
    agent = "stuck"
    async with open_amqp(amqp_url) as amqp:
        await setup_agent(amqp, agent, 1000)

        def unapplied() -> float:
            return dict((s[0]["lane"], s[1]) for s in scrape(port)["budget_lane_unapplied"])["0"]

        async with lane_blocked(database_url, agent):
            await amqp.publish_all(
                Outgoing(command("consume", agent, 1), agent, message_id=f"stuck-{i}")
                for i in range(20)
            )
            await eventually(unapplied, within=30, what="held", done=lambda n: n == 20)
        await eventually(unapplied, within=30, what="applied", done=lambda n: n == 0)
    assert commands(port)[("consume", "applied")] == 20


async def test_a_command_the_database_rejects_is_counted_and_dead_lettered_by_code(
    worker_process: Callable[..., WorkerProcess], amqp_url: str, database_url: str
) -> None:
    port = free_port()
    worker = worker_process(metrics_port=port)
    await worker.wait_ready()
    async with open_amqp(amqp_url) as amqp:
        await setup_agent(amqp, "poison", 100)
        engine = create_engine(database_url)
        try:
            await install_poison_trigger(engine)  # any ledger row of 'poison' is refused
        finally:
            await engine.dispose()
        await amqp.publish(Outgoing(command("consume", "poison", 5), "poison", message_id="p-1"))
        counted = await counted_once_settled(port, 3)
        assert await amqp.ready_count(DEAD_LETTER_QUEUE) == 1
    assert counted == {
        ("register_agent", "applied"): 1,
        ("allocate", "applied"): 1,
        ("consume", "rejected"): 1,
    }
    assert scrape(port)["budget_dead_letters_total"] == [({"code": "database_rejected"}, 1.0)]
