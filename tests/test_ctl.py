"""``budgetctl`` as an operator runs it: a real process against the running worker.

Processes are awaited with asyncio, so the in-process worker keeps serving.
"""

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.amqp_helpers import connect
from tests.db_helpers import reader
from tests.eventually import eventually
from tests.support import funded, unique
from token_budget.client import BudgetClient
from token_budget.schemas import BudgetView
from token_budget.worker.app import Worker
from token_budget.worker.broker.topology import TopologySpec, declare_topology
from token_budget.worker.exitcodes import ExitCode

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


Ctl = Callable[..., Awaitable[Run]]


async def run_ctl(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Run:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "token_budget.worker.ctl",
        *args,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def ctl(worker: Worker, amqp_url: str, database_url: str) -> Ctl:
    """budgetctl configured like the worker, through its environment variables."""
    env = {"BUDGET_AMQP_URL": amqp_url, "BUDGET_DATABASE_URL": database_url}

    async def call(*args: str) -> Run:
        return await run_ctl(*args, env=env)

    return call


async def test_register_prints_the_new_agent(ctl: Ctl) -> None:
    agent = unique("agent")
    run = await ctl("register", agent)
    assert (run.code, run.out) == (0, f"{agent}: registered, no budget yet\n"), run.err


async def test_allocate_prints_the_budget(ctl: Ctl, client: BudgetClient) -> None:
    agent = unique("agent")
    await client.register_agent(agent)
    run = await ctl("allocate", agent, "100")
    expected = f"{agent}: allocated=100 used=0 reserved=0 available=100\n"
    assert (run.code, run.out) == (0, expected), run.err


async def test_consume_wait_prints_the_budget_after_consuming(
    ctl: Ctl, client: BudgetClient
) -> None:
    agent = await funded(client, 100)
    run = await ctl("consume", agent, "30", "--wait")
    expected = f"{agent}: allocated=100 used=30 reserved=0 available=70\n"
    assert (run.code, run.out) == (0, expected), run.err


async def test_consume_is_confirmed_then_applied(ctl: Ctl, client: BudgetClient) -> None:
    agent = await funded(client, 100)
    run = await ctl("consume", agent, "30", "--json", "--message-id", "op-1")
    assert run.code == 0, run.err
    assert json.loads(run.out) == {
        "agent_id": agent,
        "tokens": 30,
        "message_id": "op-1",
        "status": "confirmed",
    }
    await eventually(
        lambda: client.get_available(agent),
        within=20,
        what="the confirmed consume applied",
        done=lambda available: available == 70,
    )


async def test_show_prints_the_budget_as_text_or_json(ctl: Ctl, client: BudgetClient) -> None:
    agent = await funded(client, 50)
    await client.consume_and_wait(agent, 8)
    text, as_json = await ctl("show", agent), await ctl("show", agent, "--json")
    expected = f"{agent}: allocated=50 used=8 reserved=0 available=42\n"
    assert (text.code, text.out) == (0, expected), text.err
    assert BudgetView.model_validate_json(as_json.out) == BudgetView(
        agent_id=agent, allocated_tokens=50, used_tokens=8, available_tokens=42
    )


async def test_list_prints_agents_in_order(ctl: Ctl, client: BudgetClient) -> None:
    prefix = unique("agent")
    await client.register_agent(f"{prefix}-b")
    await client.register_agent(f"{prefix}-a")
    await client.allocate(f"{prefix}-b", 9)
    run = await ctl("list")
    assert (run.code, run.out) == (
        0,
        f"{prefix}-a: registered, no budget yet\n"
        f"{prefix}-b: allocated=9 used=0 reserved=0 available=9\n",
    ), run.err
    limited = await ctl("list", "--limit", "1", "--json")
    assert [json.loads(line)["agent_id"] for line in limited.out.splitlines()] == [f"{prefix}-a"]


async def test_retry_with_the_same_message_id_applies_once(ctl: Ctl, client: BudgetClient) -> None:
    agent = unique("agent")
    await client.register_agent(agent)
    first = await ctl("allocate", agent, "10", "--message-id", "grant-1")
    again = await ctl("allocate", agent, "10", "--message-id", "grant-1")
    expected = f"{agent}: allocated=10 used=0 reserved=0 available=10\n"
    assert first.out == again.out == expected, again.err
    assert await client.get_available(agent) == 10


async def test_insufficient_budget_exits_1_with_the_code(ctl: Ctl, client: BudgetClient) -> None:
    agent = await funded(client, 5)
    run = await ctl("consume", agent, "6", "--wait")
    assert run.code == 1 and run.out == ""
    assert "insufficient_budget" in run.err and "6 tokens, 5 available" in run.err


async def test_invalid_amount_exits_1_before_publishing(ctl: Ctl) -> None:
    run = await ctl("allocate", unique("agent"), "0")
    assert run.code == 1 and "invalid_command" in run.err


async def test_unreachable_broker_exits_2() -> None:
    run = await run_ctl("show", "agent-1", "--amqp-url", "amqp://guest:secret@127.0.0.1:1/")
    assert run.code == 2 and run.out == ""
    assert "broker_unavailable" in run.err and "secret" not in run.err


async def test_unreachable_database_exits_2() -> None:
    url = "postgresql+asyncpg://postgres:secret@127.0.0.1:1/budget"
    run = await run_ctl("list", "--database-url", url)
    assert run.code == 2 and "database error" in run.err and "secret" not in run.err


# history, reconcile and workers read the books back.


async def test_history_lists_the_agents_changes_in_order(ctl: Ctl, client: BudgetClient) -> None:
    agent = await funded(client, 100)
    await client.consume_and_wait(agent, 30, message_id=f"{agent}-c1")
    run = await ctl("history", agent, "--json")
    assert run.code == 0, run.err
    rows = [json.loads(line) for line in run.out.splitlines()]
    assert [(r["seq"], r["kind"], r["amount"]) for r in rows] == [
        (1, "allocate", 100),
        (2, "consume", 30),
    ]
    assert rows[-1]["message_id"] == f"{agent}-c1"
    assert (rows[-1]["allocated_after"], rows[-1]["used_after"]) == (100, 30)


async def test_reconcile_exits_zero_when_the_books_are_exact(
    ctl: Ctl, client: BudgetClient
) -> None:
    agent = await funded(client, 100)
    await client.consume_and_wait(agent, 10)
    run = await ctl("reconcile")
    assert (run.code, run.out) == (0, "books reconcile: no difference\n"), run.err


async def test_reconcile_exits_non_zero_and_names_a_tampered_balance(
    ctl: Ctl, client: BudgetClient, database_url: str
) -> None:
    agent = await funded(client, 100)
    async with reader(database_url) as engine, engine.begin() as conn:
        await conn.execute(
            text("UPDATE budgets SET used_tokens = 7 WHERE agent_id = :a"), {"a": agent}
        )
    run = await ctl("reconcile")
    assert run.code == 3
    assert f"{agent}: used_tokens = sum of ledger: expected 0, found 7" in run.out
    assert "do not reconcile" in run.err


async def test_workers_shows_the_live_worker_and_its_partitions(ctl: Ctl, worker: Worker) -> None:
    run = await ctl("workers", "--json")
    assert run.code == 0, run.err
    (row,) = [json.loads(line) for line in run.out.splitlines()]
    assert row["worker_id"] == worker.worker_id
    assert (row["state"], row["partitions"]) == ("live", [0, 1, 2, 3])


# Exit codes: 2 only for what may pass with time, so a script can retry on it.


@pytest.mark.parametrize(
    "args", [("consume", "agent-7", "abc"), ("show",), ("nosuchcommand",), ("list", "--limit", "0")]
)
async def test_a_usage_error_exits_64_not_2(args: tuple[str, ...]) -> None:
    run = await run_ctl(*args)
    assert run.code == ExitCode.USAGE == 64, run.err
    assert "usage: budgetctl" in run.err and run.out == ""


async def test_help_names_the_exit_codes() -> None:
    run = await run_ctl("--help")
    assert run.code == 0
    assert "64 usage error" in run.out and "2 unreachable or no reply" in run.out


async def _lanes_without_a_worker(amqp_url: str) -> None:
    connection = await connect(amqp_url)
    try:
        await declare_topology(connection, TopologySpec(partitions=4, delivery_limit=20))
    finally:
        await connection.close()


@pytest.mark.parametrize(
    "args",
    [("show", "agent-7"), ("register", "agent-7"), ("consume", "agent-7", "5", "--wait")],
)
@pytest.mark.parametrize("declared", [True, False], ids=["lanes-idle", "never-deployed"])
async def test_with_no_worker_on_the_lanes_a_request_fails_at_once_with_2(
    amqp_url: str, args: tuple[str, ...], declared: bool
) -> None:
    if declared:
        await _lanes_without_a_worker(amqp_url)
    # A timeout far beyond the subprocess's own bound: only the probe can answer in time.
    run = await run_ctl(*args, "--timeout", "600", env={"BUDGET_AMQP_URL": amqp_url})
    assert run.code == ExitCode.UNREACHABLE, run.err
    assert "no worker is consuming the lanes: start one with `make run`" in run.err
    assert "may or may not" not in run.err


async def test_history_of_an_unknown_agent_exits_1_like_show(ctl: Ctl) -> None:
    run = await ctl("history", "nosuchagent")
    assert (run.code, run.out) == (ExitCode.REFUSED, ""), run.err
    assert "agent_not_found" in run.err and "'nosuchagent'" in run.err


async def test_history_of_an_agent_without_changes_exits_0(ctl: Ctl, client: BudgetClient) -> None:
    agent = unique("agent")
    await client.register_agent(agent)
    run = await ctl("history", agent)
    assert (run.code, run.out) == (0, ""), run.err


async def test_workers_exits_2_when_no_worker_is_live(engine: object, database_url: str) -> None:
    run = await run_ctl("workers", env={"BUDGET_DATABASE_URL": database_url})
    assert run.code == ExitCode.UNREACHABLE, run.err
    assert "no workers" in run.out
    assert "no worker is live: start one with `make run`" in run.err


# The default database is the user's, wherever budgetctl and the worker start.


def _default_db_env(data_home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BUDGET_DATABASE_URL"}
    return {**env, "XDG_DATA_HOME": str(data_home)}


async def test_list_without_a_database_refuses_and_creates_nothing(tmp_path: Path) -> None:
    data_home, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = await run_ctl("list", env=_default_db_env(data_home), cwd=elsewhere)
    expected = data_home / "token-budget" / "budget.db"
    assert run.code == ExitCode.UNREACHABLE
    assert f"no database at {expected}: start the worker first" in run.err
    assert "--database-url/BUDGET_DATABASE_URL" in run.err
    assert not data_home.exists() and list(elsewhere.iterdir()) == []


async def test_the_worker_and_budgetctl_share_the_default_database_from_any_directory(
    tmp_path: Path,
) -> None:
    data_home = tmp_path / "data"
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    env = _default_db_env(data_home)
    migrate = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "token_budget.worker",
        "migrate",
        cwd=here,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(migrate.communicate(), 60)
    assert migrate.returncode == 0, output.decode()
    assert (data_home / "token-budget" / "budget.db").is_file()
    run = await run_ctl("workers", "--json", env=env, cwd=there)
    # The schema is there (no "no such table"): nobody is live yet.
    assert (run.code, run.out) == (ExitCode.UNREACHABLE, ""), run.err
    assert list(here.iterdir()) == list(there.iterdir()) == []
