"""``budgetctl`` for people: the tables and bars (``worker/ctl_render.py``), and
``watch`` and ``--json`` as an operator runs them, in a terminal or a pipe.

A terminal is a pseudo-terminal the test holds, so budgetctl's own
``isatty`` decides, as it does at a desk.
"""

import asyncio
import io
import json
import os
import pty
import re
import signal
import sys
from collections.abc import Callable

import pytest
from rich.console import Console

from tests.support import funded, unique
from tests.test_ctl import ROOT, Ctl, Run, run_ctl
from token_budget.client import BudgetClient
from token_budget.worker.app import Worker
from token_budget.worker.ctl_render import Row, UsageBar, budget_table, repeat
from token_budget.worker.store import views


def rendered(renderable: object, width: int = 72) -> list[str]:
    """What a colourless terminal of ``width`` columns shows, line by line."""
    out = Console(file=io.StringIO(), width=width, color_system=None)
    out.print(renderable)
    assert isinstance(out.file, io.StringIO)
    return [line.rstrip() for line in out.file.getvalue().splitlines()]


def bar(allocated: int | None, used: int | None, reserved: int = 0, group: bool = False) -> str:
    row = Row("a", allocated, used, reserved, group=group)
    return UsageBar(row).text(width=20).plain


# The table and its bars, rendered alone.


def test_a_table_aligns_names_left_and_numbers_right_with_a_bar_each() -> None:
    rows = [
        Row("agent-a", 1000, 250, 100),
        Row("agent-bb", None, None, None),
        Row("team", None, 5, 0, group=True, depth=1),
    ]
    assert rendered(budget_table(rows)) == [
        "",
        " agent     allocated  used  reserved  available  usage",
        " " + "─" * 69,
        " agent-a       1,000   250       100        650  ████▒▒░░░░░░░░░░  25%",
        " agent-bb          -     -         -          -  no budget yet",
        "   team            -     5         0          -  no limit",
        "",
    ]


def test_a_bar_shows_used_then_reserved_then_free_cells() -> None:
    assert bar(100, 50, 25) == "█" * 10 + "▒" * 5 + "░" * 5 + "  50%"


def test_an_agent_without_a_budget_has_no_bar() -> None:
    assert bar(None, None) == "no budget yet"


def test_a_group_without_allocation_has_no_limit() -> None:
    assert bar(None, 30, group=True) == "no limit"


def test_a_full_budget_fills_the_bar() -> None:
    assert bar(100, 100) == "█" * 20 + " 100%"


def test_used_beyond_the_allocation_fills_the_bar_and_shows_the_real_share() -> None:
    assert bar(100, 120) == "█" * 20 + " 120%"


def test_any_use_shows_a_cell_and_only_all_of_it_fills_the_bar() -> None:
    assert bar(10_000, 1) == "█" + "░" * 19 + "   0%"
    assert bar(10_000, 9_999) == "█" * 19 + "░" + " 100%"


def test_a_terminal_that_cannot_encode_blocks_gets_an_ascii_bar() -> None:
    raw = io.BytesIO()
    ascii_file = io.TextIOWrapper(raw, encoding="ascii")
    Console(file=ascii_file, width=40, color_system=None).print(
        UsageBar(Row("a", 100, 50, 25), width=16)
    )
    ascii_file.flush()
    assert raw.getvalue().decode() == "#" * 8 + "+" * 4 + "." * 4 + "  50%\n"


def test_a_narrow_terminal_shrinks_the_bar_not_the_numbers() -> None:
    row = Row("agent-with-a-long-name-0001", 1_000_000, 250_000, 100_000)
    (line,) = [line for line in rendered(budget_table([row]), width=72) if "%" in line]
    assert "1,000,000" in line and "250,000" in line and "650,000" in line
    assert line.endswith("  25%") and "…" not in line


async def test_repeat_stops_after_count_steps_without_sleeping_after_the_last() -> None:
    steps: list[int] = []

    async def step() -> None:
        steps.append(len(steps))

    await repeat(step, every=3600, count=1)
    assert steps == [0]


# budgetctl in a terminal, a pipe, and with --json.


async def run_in_terminal(*args: str, env: dict[str, str]) -> Run:
    """budgetctl with its stdout on a pseudo-terminal 100 columns wide; what it
    shows, without styles and cursor moves."""
    leader, follower = pty.openpty()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "token_budget.worker.ctl",
            *args,
            cwd=ROOT,
            env={**os.environ, **env, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "xterm"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=follower,
            stderr=asyncio.subprocess.PIPE,
        )
    finally:
        os.close(follower)
    try:
        reading = asyncio.create_task(asyncio.to_thread(_read_all, leader))
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        out = await asyncio.wait_for(reading, 60)
    finally:
        os.close(leader)
    assert proc.returncode is not None
    shown = ANSI.sub("", out.decode()).replace("\r\n", "\n")
    return Run(proc.returncode, shown, err.decode())


#: A terminal's control sequences: styles, cursor moves, erasing lines.
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def env(worker: Worker, amqp_url: str, database_url: str) -> dict[str, str]:
    return {"BUDGET_AMQP_URL": amqp_url, "BUDGET_DATABASE_URL": database_url}


@pytest.fixture
def ctl(env: dict[str, str]) -> Ctl:
    async def call(*args: str) -> Run:
        return await run_ctl(*args, env=env)

    return call


async def three_agents(client: BudgetClient) -> tuple[str, str, str]:
    """90 %, 10 % and 50 % of 100 tokens used, changed in that order."""
    agents = []
    for used in (90, 10, 50):
        agent = await funded(client, 100)
        await client.consume_and_wait(agent, used)
        agents.append(agent)
    return agents[0], agents[1], agents[2]


def positions(text: str, names: tuple[str, ...]) -> list[int]:
    return [text.index(name) for name in names]


def cells(text: str, name: str) -> list[str]:
    """The cells of ``name``'s row in the last table budgetctl printed (a live
    view redraws the same table)."""
    *_, line = [line for line in text.splitlines() if line.split()[:1] == [name]]
    return line.split()


async def test_list_in_a_terminal_prints_a_table_with_bars(
    env: dict[str, str], client: BudgetClient
) -> None:
    agent = await funded(client, 1000)
    await client.consume_and_wait(agent, 250)
    run = await run_in_terminal("list", env=env)
    assert run.code == 0, run.err
    assert "allocated  used  reserved  available  usage" in run.out
    assert cells(run.out, agent) == [agent, "1,000", "250", "0", "750", "████" + "░" * 12, "25%"]


async def test_show_in_a_terminal_prints_a_table_with_a_bar(
    env: dict[str, str], client: BudgetClient
) -> None:
    agent = await funded(client, 100)
    run = await run_in_terminal("show", agent, env=env)
    assert run.code == 0, run.err
    assert cells(run.out, agent) == [agent, "100", "0", "0", "100", "░" * 16, "0%"]


@pytest.mark.parametrize("command", ["list", "show"])
async def test_json_in_a_terminal_is_the_json_of_a_pipe(
    env: dict[str, str], ctl: Ctl, client: BudgetClient, command: str
) -> None:
    agent = await funded(client, 100)
    args = ("list", "--json") if command == "list" else ("show", agent, "--json")
    in_terminal, in_pipe = await run_in_terminal(*args, env=env), await ctl(*args)
    assert (in_terminal.code, in_terminal.out) == (0, in_pipe.out), in_terminal.err
    assert json.loads(in_pipe.out) == {
        "agent_id": agent,
        "allocated_tokens": 100,
        "used_tokens": 0,
        "reserved_tokens": 0,
        "available_tokens": 100,
    }


async def test_group_tree_in_a_terminal_indents_names_in_one_table(
    env: dict[str, str], client: BudgetClient
) -> None:
    org, agent = unique("org"), unique("agent")
    await client.register_group(org)
    await client.allocate_group(org, 1000)
    await client.register_agent(agent, group_id=org)
    run = await run_in_terminal("group", "tree", org, env=env)
    assert run.code == 0, run.err
    assert cells(run.out, org) == [org, "1,000", "0", "0", "1,000", "░" * 16, "0%"]
    assert cells(run.out, agent) == [agent, "-", "-", "-", "-", "no", "budget", "yet"]
    assert f"\n   {agent}" in run.out  # indented under its group


async def test_watch_in_a_terminal_shows_the_busiest_agents_first(
    env: dict[str, str], client: BudgetClient
) -> None:
    most, least, middle = await three_agents(client)
    run = await run_in_terminal("watch", "--top", "2", "--count", "1", env=env)
    assert run.code == 0, run.err
    assert "top 2 agents, most of their budget held" in run.out
    assert least not in run.out
    first, second = positions(run.out, (most, middle))
    assert first < second
    assert cells(run.out, most)[:5] == [most, "100", "90", "10", "█" * 14 + "░" * 2]
    assert cells(run.out, middle)[:5] == [middle, "100", "50", "50", "█" * 8 + "░" * 8]


async def test_watch_by_recent_lists_the_last_changed_first(
    env: dict[str, str], client: BudgetClient, database_url: str
) -> None:
    most, least, middle = await three_agents(client)
    rows = await views.busiest(database_url, 3, by="recent")
    assert [row["agent_id"] for row in rows] == [middle, least, most]


async def test_watch_json_prints_one_object_per_refresh(ctl: Ctl, client: BudgetClient) -> None:
    agent = await funded(client, 100)
    run = await ctl("watch", "--json", "--count", "2", "--interval", "0.01")
    assert run.code == 0, run.err
    refreshes = [json.loads(line) for line in run.out.splitlines()]
    expected = {
        "agent_id": agent,
        "allocated_tokens": 100,
        "used_tokens": 0,
        "reserved_tokens": 0,
        "available_tokens": 100,
    }
    assert refreshes == [{"agents": [expected]}] * 2


async def test_watch_in_a_pipe_prints_each_refresh_as_a_colourless_table(
    ctl: Ctl, client: BudgetClient
) -> None:
    agent = await funded(client, 100)
    run = await ctl("watch", "--count", "2", "--interval", "0.01")
    assert run.code == 0, run.err
    assert run.out.count(agent) == 2 and "\x1b[" not in run.out


def _default_interrupt() -> None:
    # A runner may start tests with SIGINT ignored; budgetctl must see it as a person's Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_watch_exits_0_on_ctrl_c(env: dict[str, str], client: BudgetClient) -> None:
    await funded(client, 100)
    preexec: Callable[[], None] = _default_interrupt
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "token_budget.worker.ctl",
        "watch",
        "--json",
        "--interval",
        "0.05",
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=preexec,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert json.loads(first)["agents"], first
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.wait(), 60)
    err = (await proc.stderr.read()).decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


@pytest.mark.parametrize("args", [("--top", "0"), ("--interval", "0"), ("--count", "0")])
async def test_watch_refuses_a_bound_below_one_step_as_a_usage_error(
    args: tuple[str, ...],
) -> None:
    run = await run_ctl("watch", *args)
    assert run.code == 64 and "usage: budgetctl" in run.err, run.err
