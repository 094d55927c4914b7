"""The cost of a shared group: the same drain, its agents in one team under one org
or in no group, in one database, in one run.

Every batch that charges a group reads its agents' chains, then locks and
updates the group rows: here always the same two. On PostgreSQL concurrent
transactions (two writers per process, more with more processes) wait for each
other on them; SQLite has one writer anyway. Both groups have ample
allocations: every level checks every consume and none refuses one.

The groups are registered and allocated through the worker (the org first);
both sets of agents are loaded in bulk (``scaling.bulk_load``). Each set is
drained once unmeasured (a freshly loaded database's first drain is slower,
whichever set it drains), then the sets alternate (ungrouped, grouped,
grouped, ungrouped, ...) so that drift over the run cancels; each drain has
fresh workers, and a set's figure is the mean of its drains.
"""

import asyncio
import contextlib
import sqlite3
import statistics
from typing import Any

import asyncpg

from .config import BenchConfig
from .infra import Database, RabbitAdmin
from .scaling import bulk_load
from .traffic import agent_names, group_commands, publish
from .workers import Prepared, drain, prepare

__all__ = ["ORG", "TEAM", "group_cost"]

ORG, TEAM = "bench-org", "bench-team"
SETS = ("ungrouped", "grouped")
#: What each drain reports.
_KEPT = ("msgs_per_s", "cpu_us_per_msg", "mean_batch", "seconds", "batch_busy_s", "per_process")
_MEANS = ("msgs_per_s", "cpu_us_per_msg", "mean_batch")

_ALLOCATED_GROUPS = "SELECT count(*) FROM groups WHERE allocated_tokens IS NOT NULL"
_LEAST_GROUP_USED = "SELECT coalesce(min(used_tokens), -1) FROM groups"


def _sqlite_count(path: str, sql: str) -> int:
    conn = sqlite3.connect(path, timeout=30)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


async def _count(database: Database, sql: str) -> int:
    if database.kind == "sqlite":
        return await asyncio.to_thread(_sqlite_count, database.dsn, sql)
    conn = await asyncpg.connect(database.dsn)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def _wait_groups(database: Database, count: int, within: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while (found := await _count(database, _ALLOCATED_GROUPS)) < count:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{found} of {count} groups registered and allocated")
        await asyncio.sleep(0.05)


def _order(rounds: int) -> list[str]:
    """ungrouped, grouped, then grouped, ungrouped, ...: each set first as often."""
    return [s for r in range(rounds) for s in (SETS if r % 2 == 0 else SETS[::-1])]


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    means: dict[str, Any] = {}
    for key in _MEANS:
        values = [run[key] for run in runs if run[key] is not None]
        means[key] = round(statistics.fmean(values), 1) if values else None
    return {**means, "runs": runs}


async def group_cost(config: BenchConfig, admin: RabbitAdmin, kind: str) -> dict[str, Any]:
    """``config.n`` consumes over ``config.agents`` agents in no group, and over as
    many in one team under one org; for each of ``config.group_processes``."""
    points: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        prepared, setup = await prepare(stack, admin, config, kind, f"gr{kind[:2]}", [])
        # The team's registration names the org: the org is applied first.
        await publish(prepared.amqp_url, group_commands(ORG))
        await _wait_groups(prepared.database, 1)
        await publish(prepared.amqp_url, group_commands(TEAM, ORG))
        await _wait_groups(prepared.database, 2)
        await setup.stop()
        agents = {
            "ungrouped": agent_names(config.agents, "solo"),
            "grouped": agent_names(config.agents, "team"),
        }
        await bulk_load(prepared.database, agents["ungrouped"])
        await bulk_load(prepared.database, agents["grouped"], TEAM)
        warm_up = max(config.n // 5, 1)
        for label in SETS:
            prepared.agents = agents[label]
            await drain(prepared, processes=1, backlog=warm_up, tag=f"w{label[0]}")
        for processes in config.group_processes:
            points[str(processes)] = await _point(prepared, agents, processes)
        # Both levels were charged with every grouped consume (one token each).
        charged = await _count(prepared.database, _LEAST_GROUP_USED)
        expected = warm_up + config.n * config.group_rounds * len(config.group_processes)
        if charged != expected:
            raise RuntimeError(f"the groups were charged {charged} tokens, not {expected}")
    first = points[str(config.group_processes[0])]
    return {
        "database": kind,
        "agents": config.agents,
        "n": config.n,
        "rounds": config.group_rounds,
        "points": points,
        "ratio": first["ratio"],
        "note": "grouped / ungrouped commands per second (means of alternating drains): "
        f"agents in {TEAM!r} under {ORG!r} against as many in no group, one database",
    }


async def _point(
    prepared: Prepared, agents: dict[str, list[str]], processes: int
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in SETS}
    for index, label in enumerate(_order(prepared.config.group_rounds)):
        prepared.agents = agents[label]
        result = await drain(
            prepared,
            processes=processes,
            backlog=prepared.config.n,
            tag=f"{label[0]}{processes}-{index}",
        )
        runs[label].append({k: result[k] for k in _KEPT})
    alone, grouped = _summary(runs["ungrouped"]), _summary(runs["grouped"])
    return {
        "processes": processes,
        "ungrouped": alone,
        "grouped": grouped,
        "ratio": _div(grouped["msgs_per_s"], alone["msgs_per_s"]),
        "cpu_ratio": _div(grouped["cpu_us_per_msg"], alone["cpu_us_per_msg"]),
    }


def _div(top: Any, bottom: Any) -> float | None:
    if not top or not bottom:
        return None
    return round(float(top) / float(bottom), 3)
