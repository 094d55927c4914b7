"""The real worker's scenarios: drains, RPC latency beside an echo, peak memory.

Each scenario owns a vhost, a database and a temp directory on its own
``AsyncExitStack``: whatever fails, workers are stopped and all three removed.
"""

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .config import BenchConfig
from .infra import RabbitAdmin
from .traffic import RpcClient, agent_names, latency_summary
from .workers import Prepared, drain, prepare

__all__ = ["rpc_latency", "rss", "worker_drain"]

#: Seconds to wait for a reply; a reply that does not come fails the run.
_IDLE_WAIT = 10.0
_DRAIN_WAIT = 120.0


async def worker_drain(
    config: BenchConfig, admin: RabbitAdmin, kind: str, processes: int | None
) -> dict[str, Any]:
    """``config.n`` consumes from a pre-filled backlog, ``processes`` workers
    (None: one ``budget-worker`` with its default process count)."""
    async with contextlib.AsyncExitStack() as stack:
        prepared, setup = await prepare(
            stack, admin, config, kind, f"{kind[:2]}{processes or 'd'}", agent_names(config.agents)
        )
        await setup.stop()
        if processes is None:
            return await drain(prepared, processes=1, backlog=config.n, tag="c", supervised=True)
        return await drain(prepared, processes=processes, backlog=config.n, tag="c")


async def rss(config: BenchConfig, admin: RabbitAdmin) -> dict[str, Any]:
    """Peak RSS of a fresh worker draining a small, then a large backlog (SQLite)."""
    points: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        prepared, setup = await prepare(
            stack, admin, config, "sqlite", "rss", agent_names(config.agents)
        )
        await setup.stop()
        for backlog in config.rss_backlogs:
            result = await drain(
                prepared, processes=1, backlog=backlog, tag=f"r{backlog}", rss_every=0.5
            )
            points[str(backlog)] = {
                "backlog": backlog,
                "vmhwm_kib": result["vmhwm_kib"][0],
                "vmhwm_ready_kib": result["vmhwm_ready_kib"][0],
                "seconds": result["seconds"],
                "msgs_per_s": result["msgs_per_s"],
                "vmrss_series_kib": result["rss_series"],
            }
    small, large = (points[str(b)]["vmhwm_kib"] for b in config.rss_backlogs)
    return {
        "database": "sqlite",
        "points": points,
        "ratio_large_small": round(large / small, 3) if small and large else None,
    }


def _spawn_echo(amqp_url: str, partitions: int, log_path: Path) -> "subprocess.Popen[bytes]":
    # Its stderr goes to a file: a pipe nobody reads fills up and blocks it.
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.echo", amqp_url, str(partitions)],
            stdout=subprocess.PIPE,
            stderr=log,
        )


async def _start_echo(
    stack: contextlib.AsyncExitStack, amqp_url: str, partitions: int, workdir: Path
) -> None:
    log_path = workdir / "echo.log"
    proc = _spawn_echo(amqp_url, partitions, log_path)

    async def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)
        if proc.stdout is not None:
            proc.stdout.close()

    stack.push_async_callback(stop)
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    if line.strip() != b"ready":
        tail = log_path.read_text(errors="replace")[-500:]
        raise RuntimeError(f"echo server did not start: {line!r} {tail}")


class _Samples:
    """Latencies of one kind of call. A reply that never comes fails the run:
    leaving it out would make the percentiles look better than they are."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.latencies: list[float] = []

    async def take(self, call: Callable[[], Awaitable[float]]) -> None:
        try:
            self.latencies.append(await call())
        except TimeoutError:
            raise RuntimeError(f"{self.what}: a call got no reply in time") from None

    def summary(self) -> dict[str, Any]:
        return latency_summary(self.latencies)


async def _until(drained: asyncio.Event, samples: _Samples, call: Any) -> None:
    """Sequential calls until ``drained`` is set (the call in flight finishes)."""
    while not drained.is_set():
        await samples.take(call)


async def rpc_latency(config: BenchConfig, admin: RabbitAdmin) -> dict[str, Any]:
    """get_budget through the worker against the echo, idle and during a drain."""
    callers = agent_names(config.rpc_drain_callers, "rpc")
    async with contextlib.AsyncExitStack() as stack:
        prepared, worker = await prepare(
            stack, admin, config, "sqlite", "rpc", agent_names(config.agents) + callers
        )
        await _start_echo(stack, prepared.amqp_url, config.partitions, prepared.workdir)
        client = await RpcClient.open(prepared.amqp_url)
        stack.push_async_callback(client.close)
        # Warm up both paths (connections, statement caches), then interleave
        # the calls so that both sides see the same machine noise.
        for _ in range(20):
            await client.echo(callers[0], within=_IDLE_WAIT)
            await client.get_budget(callers[0], within=_IDLE_WAIT)
            await client.get_budget_committed(callers[0], within=_IDLE_WAIT)
        echo_idle, worker_idle = _Samples("echo, idle"), _Samples("get_budget, idle")
        committed_idle = _Samples("committed get_budget, idle")
        for _ in range(config.rpc_calls):
            await echo_idle.take(lambda: client.echo(callers[0], within=_IDLE_WAIT))
            await worker_idle.take(lambda: client.get_budget(callers[0], within=_IDLE_WAIT))
            await committed_idle.take(
                lambda: client.get_budget_committed(callers[0], within=_IDLE_WAIT)
            )
        await worker.stop()
        result = await _drain_with_rpc(prepared, client, callers)
    during = result.pop("during")
    return {
        "database": "sqlite",
        "echo_idle": echo_idle.summary(),
        "worker_idle": worker_idle.summary(),
        "echo_drain": during["echo"].summary(),
        "worker_drain": during["worker"].summary(),
        "committed_idle": committed_idle.summary(),
        "committed_drain": during["committed"].summary(),
        "drain": {k: result[k] for k in ("n", "seconds", "msgs_per_s", "loadavg")},
        "note": (
            "get_budget is ordered behind every command already in its agent's lane, "
            "so during a drain its latency includes waiting for that lane's backlog; "
            "a committed get_budget (budget.queries) is not"
        ),
    }


async def _drain_with_rpc(
    prepared: Prepared, client: RpcClient, callers: list[str]
) -> dict[str, Any]:
    async def during(drained: asyncio.Event) -> dict[str, _Samples]:
        worker, echo = _Samples("get_budget, draining"), _Samples("echo, draining")
        committed = _Samples("committed get_budget, draining")
        await asyncio.gather(
            _until(
                drained,
                committed,
                lambda: client.get_budget_committed(callers[0], within=_DRAIN_WAIT),
            ),
            *(
                _until(drained, worker, lambda a=agent: client.get_budget(a, within=_DRAIN_WAIT))
                for agent in callers
            ),
            _until(drained, echo, lambda: client.echo(callers[0], within=_DRAIN_WAIT)),
        )
        return {"worker": worker, "echo": echo, "committed": committed}

    return await drain(prepared, processes=1, backlog=prepared.config.n, tag="q", during=during)
