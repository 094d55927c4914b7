"""Real ``python -m token_budget.worker`` processes: killed, stopped, misconfigured, checked."""

import asyncio
import json
import os
import random
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.amqp_helpers import Amqp, Outgoing, command, connect, open_amqp
from tests.db_helpers import balances, ledger_ids, ledger_size, processed_ids, reader
from tests.eventually import eventually
from tests.inprocess import running
from tests.processes import WorkerProcess
from tests.support import RabbitAdmin
from token_budget.schemas import HEADER_DUPLICATE
from token_budget.worker.app import Worker
from token_budget.worker.broker.topology import TopologyError, TopologySpec, declare_topology
from token_budget.worker.exitcodes import ExitCode
from token_budget.worker.settings import Settings
from token_budget.worker.store.audit import reconcile

PARTITIONS = 4
#: Short pool timings, so that a successor takes a dead worker's partitions soon.
FAST_POOL = {"lease_ttl": 2, "member_ttl": 2, "renew_interval": 0.5}


async def declare(amqp_url: str, delivery_limit: int = 20) -> None:
    """The topology a worker with ``partitions=4`` declares, so publishing can begin first."""
    connection = await connect(amqp_url)
    try:
        await declare_topology(connection, TopologySpec(PARTITIONS, delivery_limit))
    finally:
        await connection.close()


async def setup_agents(amqp: Amqp, agents: dict[str, int]) -> None:
    """Register every agent, then allocate; each phase confirmed before the next."""
    await amqp.publish_all(
        Outgoing(command("register_agent", a), a, message_id=f"{a}:register") for a in agents
    )
    await amqp.publish_all(
        Outgoing(command("allocate", a, t), a, message_id=f"{a}:allocate")
        for a, t in agents.items()
    )


def consumes(agents: list[str], per_agent: int, seed: int) -> list[tuple[str, str, int]]:
    """(agent, message_id, tokens), interleaved across agents."""
    rng = random.Random(seed)
    return [
        (agent, f"{agent}:consume-{i}", rng.randint(1, 100))
        for i in range(per_agent)
        for agent in agents
    ]


def as_outgoing(items: list[tuple[str, str, int]], reply_to: str | None = None) -> list[Outgoing]:
    return [
        Outgoing(command("consume", a, t), a, message_id=m, reply_to=reply_to) for a, m, t in items
    ]


def applied_so_far(process: WorkerProcess) -> int:
    """Commands the process reports applied in its ``batch_applied`` log lines."""
    return sum(
        event.get("outcomes", {}).get("applied", 0)
        for event in process.events()
        if event.get("event") == "batch_applied"
    )


async def stop_gracefully(process: WorkerProcess) -> int:
    process.signal(signal.SIGTERM)
    return await asyncio.to_thread(process.wait, 30)


def duplicates_applied(process: WorkerProcess) -> int:
    """Commands ``process`` found already recorded: redeliveries of a killed worker's."""
    return sum(
        event.get("outcomes", {}).get("duplicate", 0)
        for event in process.events()
        if event.get("event") == "batch_applied"
    )


def in_order(
    sent: list[tuple[str, str, int]], allocated: dict[str, int]
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """What applying ``sent`` in order does: used tokens and ledger ids per agent."""
    used = dict.fromkeys(allocated, 0)
    ledger = {a: [f"{a}:allocate"] for a in allocated}
    for agent, message_id, tokens in sent:
        if used[agent] + tokens <= allocated[agent]:
            used[agent] += tokens
            ledger[agent].append(message_id)
    return used, ledger


@pytest.mark.slow
async def test_worker_killed_mid_stream_loses_and_doubles_nothing(
    worker_process: Callable[..., WorkerProcess], amqp_url: str, database_url: str
) -> None:
    agents = [f"agent-{n:02d}" for n in range(30)]
    sent = consumes(agents, 100, seed=3)
    wanted = {a: sum(t for b, _, t in sent if b == a) for a in agents}
    # Less than the consumes ask for: which ones are refused depends on the order.
    allocated = {a: wanted[a] * 7 // 10 for a in agents}
    used, expected_ledger = in_order(sent, allocated)
    await declare(amqp_url)
    async with open_amqp(amqp_url) as amqp:
        await setup_agents(amqp, allocated)
        # Replies widen the window between a batch's commit and its acknowledgement,
        # where a kill leaves applied commands to be delivered again.
        reply_to, replies = await amqp.reply_queue()
        # Published a chunk before each kill, so that every kill meets a worker
        # at work: with the whole stream queued at once, a fast worker finished
        # it after a few kills and the rest met an idle one (a CI failure).
        chunks = [sent[i : i + 300] for i in range(0, len(sent), 300)]
        async with reader(database_url) as engine:
            # Progress is counted in recorded outcomes: a refused consume
            # writes no ledger row.
            async def outcomes() -> int:
                return len(await processed_ids(engine))

            # Killed at random points until one kill lands between a commit and
            # its acknowledgement: its successor then meets a redelivered
            # command it has already applied.
            duplicates, kills, published = 0, 0, 2 * len(agents)
            current = worker_process(batch_max=16, prefetch=64, **FAST_POOL)
            await current.wait_ready()
            while duplicates == 0 and chunks:
                chunk = chunks.pop(0)
                done = await outcomes()
                await amqp.publish_all(as_outgoing(chunk, reply_to))
                published += len(chunk)
                await eventually(
                    outcomes,
                    within=60,
                    what="progress before the kill",
                    done=lambda n, d=done: n >= d + 60,
                )
                current.kill()
                kills += 1
                current = worker_process(batch_max=16, prefetch=64, **FAST_POOL)
                await current.wait_ready()
                # Redeliveries come first on a lane: once the successor has made
                # some progress, any it met are counted.
                mark = await outcomes()
                await eventually(
                    outcomes,
                    within=60,
                    what="the successor applying",
                    done=lambda n, m=mark, p=published: n >= min(m + 40, p),
                )
                duplicates = duplicates_applied(current)
            for chunk in chunks:
                await amqp.publish_all(as_outgoing(chunk, reply_to))
            assert duplicates > 0, f"no kill in {kills} hit the commit-to-acknowledgement window"
            # Refused consumes write no ledger row: count the recorded outcomes.
            await eventually(
                outcomes,
                within=60,
                what="every outcome recorded",
                done=lambda n: n >= 2 * len(agents) + len(sent),
            )
            assert await stop_gracefully(current) == 0
            backlog = await amqp.lane_backlog(PARTITIONS)
            assert backlog == dict.fromkeys(backlog, 0)
            assert await balances(engine) == {a: (allocated[a], used[a]) for a in agents}
            # Exactly once each, in published order.
            assert await ledger_ids(engine) == expected_ledger
            assert len(await processed_ids(engine)) == 2 * len(agents) + len(sent)
            assert await reconcile(engine) == []
        # Every consume answered: a redelivered one again, identically, marked.
        expected = {m for _, m, _ in sent}
        await eventually(
            lambda: {m.correlation_id for m in replies.messages} >= expected,
            within=30,
            what="every consume answered",
        )
        assert {m.correlation_id for m in replies.messages} == expected
        repeated = 0
        for message_id, copies in replies.by_correlation().items():
            assert len({c.body for c in copies}) == 1, message_id
            fresh = [c for c in copies if not (c.headers or {}).get(HEADER_DUPLICATE)]
            assert len(fresh) <= 1, message_id
            repeated += len(copies) > 1 or not fresh
            ok = json.loads(copies[0].body)["ok"]
            assert ok is (message_id in expected_ledger[message_id.split(":")[0]]), message_id
        assert repeated >= 1


@pytest.mark.slow
async def test_sigterm_exits_cleanly_and_returns_unapplied_commands_to_the_queue(
    worker_process: Callable[..., WorkerProcess], amqp_url: str, database_url: str
) -> None:
    agents = [f"agent-{n:02d}" for n in range(20)]
    sent = consumes(agents, 100, seed=5)
    used = {a: sum(t for b, _, t in sent if b == a) for a in agents}
    first = worker_process(batch_max=16, prefetch=64, **FAST_POOL)
    await first.wait_ready()
    async with open_amqp(amqp_url) as amqp, reader(database_url) as engine:
        await setup_agents(amqp, {a: 10**6 for a in agents})
        publishing = asyncio.create_task(amqp.publish_all(as_outgoing(sent), window=50))
        # Mid-stream: a fifth of the consumes applied (its log says so; read
        # in a thread, for the log grows long while the publisher runs).
        await eventually(
            lambda: asyncio.to_thread(applied_so_far, first),
            within=60,
            what="a fifth of the consumes applied",
            done=lambda n: n >= len(agents) + len(sent) // 5,
            interval=0.05,
        )
        first.signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(first.wait, 10)
        assert exit_code == 0, first.tail()
        await publishing
        # Nothing consumes now: what was not applied must be waiting in the lanes,
        # and nothing applied may be there a second time.
        consumed_at_stop = await ledger_size(engine) - len(agents)
        backlog = await amqp.lane_backlog(PARTITIONS)
        assert consumed_at_stop + sum(backlog.values()) == len(sent), (consumed_at_stop, backlog)
        assert 0 < consumed_at_stop < len(sent)

        second = worker_process(**FAST_POOL)
        await eventually(
            lambda: ledger_size(engine),
            within=60,
            what="the successor applying the rest",
            done=lambda n: n >= len(agents) + len(sent),
        )
        assert await stop_gracefully(second) == 0
        assert await balances(engine) == {a: (10**6, used[a]) for a in agents}
        assert await ledger_size(engine) == len(agents) + len(sent)
        assert await reconcile(engine) == []
    assert any(e.get("event") == "worker_stopped" for e in first.events())


async def run_cli(*args: str, within: float = 60.0, **settings: object) -> tuple[int, str]:
    """``python -m token_budget.worker ARGS`` with ``BUDGET_*`` settings; exit code and output."""
    env = {
        **os.environ,
        "BUDGET_LOG_FORMAT": "json",
        **{f"BUDGET_{key.upper()}": str(value) for key, value in settings.items()},
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "token_budget.worker",
        *args,
        env=env,
        cwd=Path(__file__).parent.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0, output.decode(errors="replace")


async def test_check_passes_when_broker_and_database_are_reachable(
    amqp_url: str, database_url: str
) -> None:
    code, output = await run_cli("--check", amqp_url=amqp_url, database_url=database_url)
    assert code == 0, output
    assert "rabbitmq: ok" in output
    assert "database: ok" in output


async def test_check_fails_when_the_database_is_unreachable(amqp_url: str) -> None:
    code, output = await run_cli(
        "--check",
        amqp_url=amqp_url,
        database_url="postgresql+asyncpg://postgres@127.0.0.1:1/budget",
    )
    assert code == ExitCode.UNREACHABLE, output
    assert "rabbitmq: ok" in output
    assert "database: unreachable" in output


async def test_check_fails_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    code, output = await run_cli(
        "--check",
        amqp_url="amqp://guest:guest@127.0.0.1:1/",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'budget.db'}",
    )
    assert code == ExitCode.UNREACHABLE, output
    assert "rabbitmq: unreachable" in output
    assert "database: ok" in output


async def test_check_with_an_unknown_host_prints_only_its_own_lines(tmp_path: Path) -> None:
    code, output = await run_cli(
        "--check",
        amqp_url="amqp://guest:guest@nosuchhost.invalid/",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'budget.db'}",
    )
    assert code == ExitCode.UNREACHABLE, output
    lines = output.splitlines()
    assert [line.split(":")[0] for line in lines] == ["rabbitmq", "database"], output
    assert "ERROR:aiormq" not in output


async def test_check_says_a_refused_login_is_refused(
    rabbit: RabbitAdmin, vhost: str, tmp_path: Path
) -> None:
    url = rabbit.amqp_url(vhost).replace("guest:guest@", "guest:not-the-password@")
    code, output = await run_cli(
        "--check", amqp_url=url, database_url=f"sqlite+aiosqlite:///{tmp_path / 'budget.db'}"
    )
    assert code == ExitCode.REFUSED, output
    assert "rabbitmq: login refused" in output and "ACCESS_REFUSED" in output
    assert "not-the-password" not in output


async def test_worker_with_a_wrong_password_exits_1_at_once_without_retrying(
    rabbit: RabbitAdmin, vhost: str, tmp_path: Path
) -> None:
    url = rabbit.amqp_url(vhost).replace("guest:guest@", "guest:not-the-password@")
    code, output = await run_cli(
        amqp_url=url, database_url=f"sqlite+aiosqlite:///{tmp_path / 'budget.db'}"
    )
    assert code == ExitCode.REFUSED, output
    assert "budget-worker: the broker refused the login" in output
    assert "check the user and password in BUDGET_AMQP_URL" in output
    assert "broker_unavailable" not in output and "not-the-password" not in output


async def test_worker_keeps_retrying_an_unreachable_broker(tmp_path: Path) -> None:
    # An outage, not a refusal: the worker waits for the broker (here, until killed).
    log = tmp_path / "worker.log"
    process = WorkerProcess(
        log,
        amqp_url="amqp://guest:guest@127.0.0.1:1/",
        retry_max_seconds=0.2,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'budget.db'}",
    ).start()
    try:
        await eventually(
            lambda: sum(e.get("event") == "broker_unavailable" for e in process.events()) >= 3,
            within=60,
            what="three retries",
        )
        assert process.proc is not None and process.proc.poll() is None
    finally:
        process.stop()


async def test_migrate_with_the_database_down_exits_2_with_one_line_and_no_password() -> None:
    url = "postgresql+asyncpg://postgres:s3cret-pw@127.0.0.1:1/budget"
    code, output = await run_cli("migrate", database_url=url)
    assert code == ExitCode.UNREACHABLE, output
    assert "budget-worker migrate:" in output and "retry once it is up" in output
    assert "Traceback" not in output and "s3cret-pw" not in output


async def test_a_usage_error_exits_64() -> None:
    code, output = await run_cli("nosuchcommand")
    assert code == ExitCode.USAGE, output
    assert "usage: budget-worker" in output


async def test_help_names_the_exit_codes() -> None:
    code, output = await run_cli("--help")
    assert code == 0 and "64 usage error" in output and "README" in output


async def test_worker_exits_1_when_the_broker_holds_another_topology(
    amqp_url: str, tmp_path: Path
) -> None:
    # Lanes declared with another delivery limit: RabbitMQ never changes a
    # queue's arguments, so the worker cannot start and says why (TopologyError).
    await declare(amqp_url, delivery_limit=7)
    code, output = await run_cli(
        amqp_url=amqp_url,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'budget.db'}",
        partitions=PARTITIONS,
        delivery_limit=20,
    )
    assert code == ExitCode.REFUSED, output
    assert "budget-worker: the broker holds a queue or exchange with other settings" in output


@pytest.mark.sqlite_only
@pytest.mark.parametrize("other", [2, 8])
async def test_worker_refuses_another_lane_count_than_the_deployment(
    worker_settings: Settings, other: int
) -> None:
    first = Worker(worker_settings)  # declares 4 lanes
    async with running(first):
        pass
    changed = Worker(worker_settings.model_copy(update={"partitions": other}))
    with pytest.raises(TopologyError, match="BUDGET_PARTITIONS"):
        await asyncio.wait_for(changed.run(), 60)
