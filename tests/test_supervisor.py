"""``budget-worker --processes N``: one command, N workers sharing the lanes.

Faults: a child SIGKILLed under load (restarted, books exact), the parent
SIGTERMed (every child drains, exit 0), the parent SIGKILLed (no orphan
keeps lanes), a configuration the broker refuses (no restart loop, exit 1).
"""

import os
import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.amqp_helpers import connection_name
from tests.eventually import eventually
from tests.processes import WorkerProcess
from tests.support import funded
from token_budget import BudgetClient

pytestmark = [pytest.mark.slow, pytest.mark.sqlite_only]

Start = Callable[..., WorkerProcess]


def named(process: WorkerProcess, event: str) -> list[dict[str, Any]]:
    return [e for e in process.events() if e.get("event") == event]


async def two_ready(process: WorkerProcess) -> list[dict[str, Any]]:
    return await eventually(
        lambda: named(process, "worker_ready"),
        within=60,
        what="two workers ready",
        done=lambda ready: len(ready) >= 2,
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours would still answer; children of the supervisor are not ours.
    return True


async def test_two_processes_share_the_lanes_and_apply_commands(
    worker_process: Start, amqp_url: str
) -> None:
    supervisor = worker_process(processes=2)
    ready = await two_ready(supervisor)
    assert len({e["worker_id"] for e in ready}) == 2
    taken = named(supervisor, "partition_taken")
    # Four lanes, two workers: each runs two once both are in the pool.
    async with BudgetClient.connect(amqp_url, timeout=20, name=connection_name()) as client:
        agents = [await funded(client, 100) for _ in range(8)]
        for agent in agents:
            await client.consume(agent, 7)
        views = [await client.get_budget(agent) for agent in agents]
    assert all(v.used_tokens == 7 for v in views)
    await eventually(
        lambda: {e["partition"] for e in named(supervisor, "partition_taken")},
        within=30,
        what="all four lanes taken",
        done=lambda parts: parts == {0, 1, 2, 3},
    )
    assert taken  # the first worker took lanes before the second joined


async def test_a_killed_child_is_restarted_and_no_consume_is_lost_or_doubled(
    worker_process: Start, amqp_url: str
) -> None:
    supervisor = worker_process(processes=2)
    await two_ready(supervisor)
    victim = named(supervisor, "child_started")[0]["pid"]
    async with BudgetClient.connect(amqp_url, timeout=30, name=connection_name()) as client:
        agents = [await funded(client, 10_000) for _ in range(6)]
        for round_ in range(50):
            for agent in agents:
                await client.consume(agent, 1, message_id=f"{agent}-{round_}")
            if round_ == 10:
                os.kill(victim, signal.SIGKILL)
        died = await eventually(
            lambda: named(supervisor, "child_died"), within=30, what="the child's death logged"
        )
        assert died[0]["pid"] == victim
        await eventually(
            lambda: named(supervisor, "child_started"),
            within=60,
            what="a third child started",
            done=lambda started: len(started) >= 3,
        )
        views = [await client.get_budget(agent) for agent in agents]
    assert [v.used_tokens for v in views] == [50] * len(agents)


async def test_sigterm_drains_every_child_and_the_supervisor_exits_0(
    worker_process: Start,
) -> None:
    supervisor = worker_process(processes=2)
    await two_ready(supervisor)
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0
    assert len(named(supervisor, "worker_stopped")) == 2
    assert len(named(supervisor, "child_stopped")) == 2


async def test_a_killed_supervisor_leaves_no_child_behind(worker_process: Start) -> None:
    supervisor = worker_process(processes=2)
    await two_ready(supervisor)
    children = [e["pid"] for e in named(supervisor, "child_started")]
    supervisor.kill()
    await eventually(
        lambda: [pid for pid in children if alive(pid)],
        within=60,
        what="every child gone after its parent's death",
        done=lambda left: not left,
    )
    # They drained as on SIGTERM: each left the pool.
    assert len(named(supervisor, "pool_left")) == 2


async def test_a_refused_login_stops_every_child_and_exits_1_without_restarts(
    worker_process: Start, amqp_url: str
) -> None:
    wrong = amqp_url.replace("guest:guest@", "guest:not-the-password@")
    supervisor = worker_process(processes=2, amqp_url=wrong)
    assert supervisor.wait(60) == 1
    assert named(supervisor, "child_refused")
    assert not named(supervisor, "child_died")
