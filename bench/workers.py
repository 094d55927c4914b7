"""Real worker processes (``python -m token_budget.worker``) and the pre-filled backlog drain.

A scenario starts a worker once to declare its topology and migrate, registers
and allocates the agents through it, and stops it. Then the whole backlog is
published while no worker runs, the worker(s) start, and the drain is timed
from the first lane starting (the pool's first ``partition_taken``) to the
last ``batch_applied`` in their JSON logs, and also from spawn (``wall_s``);
the database's sum of used tokens says when every command is applied.
"""

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import BenchConfig
from .infra import Database, Probe, RabbitAdmin, loadavg, new_database, new_tempdir, new_vhost
from .traffic import ALLOCATION, consume_commands, publish, setup_commands

__all__ = ["Prepared", "WorkerProc", "drain", "prepare"]

_ROOT = Path(__file__).resolve().parent.parent


class WorkerProc:
    """One ``python -m token_budget.worker`` with JSON logs in its own file."""

    def __init__(self, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0
        self._scanned = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "WorkerProc":
        self._scanned = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "token_budget.worker"],
                env=self._env,
                cwd=_ROOT,
                stdout=log,
                stderr=log,
            )
        self.spawned_at = time.perf_counter()
        return self

    def events(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events

    async def wait_for(self, markers: tuple[bytes, ...], within: float = 60.0) -> None:
        """Until one of ``markers`` (e.g. ``b'"worker_ready"'``) appears in the log."""
        deadline = time.perf_counter() + within
        while time.perf_counter() < deadline:
            if self.log_path.exists():
                with self.log_path.open("rb") as log:
                    log.seek(self._scanned)
                    chunk = log.read()
                # Keep the last partial line: a marker may be cut in two.
                cut = chunk.rfind(b"\n") + 1
                if any(marker in chunk[:cut] for marker in markers):
                    return
                self._scanned += cut
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.tail()}")
            await asyncio.sleep(0.01)
        raise TimeoutError(f"no {markers} from the worker in {within}s: {self.tail()}")

    async def wait_ready(self, within: float = 60.0) -> None:
        await self.wait_for((b'"worker_ready"',), within)

    def pids(self) -> list[int]:
        """Its pid and, for a supervisor (``--processes``), its children's."""
        children = [int(e["pid"]) for e in self.events() if e.get("event") == "child_started"]
        return [self.pid, *children]

    def cpu_seconds(self) -> float | None:
        """User + system CPU its processes have used so far (/proc/<pid>/stat)."""
        total = None
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                total = used + (total or 0.0)
        return total

    def memory_kib(self, field: str = "VmHWM") -> int | None:
        """``VmHWM`` (peak resident set) or ``VmRSS`` from /proc, in KiB: of its
        largest process, for a supervisor."""
        found = None
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError, IndexError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(f"{field}:"):
                        found = max(found or 0, int(line.split()[1]))
        return found

    async def stop(self, within: float = 30.0) -> None:
        """SIGTERM (the worker finishes its batch and closes), SIGKILL if it hangs."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, within)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait, 10)

    def tail(self, lines: int = 12) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass(slots=True)
class Prepared:
    """A scenario's vhost and database with agents registered and allocated."""

    stack: contextlib.AsyncExitStack
    config: BenchConfig
    amqp_url: str
    database: Database
    workdir: Path
    agents: list[str]
    probe: Probe
    spawned: int = 0

    def spawn(self, processes: int | None = 1) -> WorkerProc:
        """Start a worker; it is stopped when the scenario's stack closes.

        ``processes=None``: ``budget-worker``'s default (one per CPU, supervised).
        """
        env = {
            **os.environ,
            "BUDGET_AMQP_URL": self.amqp_url,
            "BUDGET_DATABASE_URL": self.database.url,
            "BUDGET_PARTITIONS": str(self.config.partitions),
            "BUDGET_PREFETCH": str(self.config.prefetch),
            "BUDGET_BATCH_MAX": str(self.config.batch_max),
            "BUDGET_DELIVERY_LIMIT": str(self.config.delivery_limit),
            # batch_applied lines time the drain; info is also the default level.
            "BUDGET_LOG_LEVEL": "info",
            "BUDGET_LOG_FORMAT": "json",
            # One worker per process: the scenario starts as many as it measures.
            "BUDGET_PROCESSES": str(processes),
            "PYTHONUNBUFFERED": "1",
        }
        if processes is None:
            del env["BUDGET_PROCESSES"]
        self.spawned += 1
        worker = WorkerProc(self.workdir / f"worker-{self.spawned}.log", env).start()
        self.stack.push_async_callback(worker.stop)
        return worker


async def prepare(
    stack: contextlib.AsyncExitStack,
    admin: RabbitAdmin,
    config: BenchConfig,
    kind: str,
    tag: str,
    agents: list[str],
) -> tuple[Prepared, WorkerProc]:
    """Declare, migrate, register and allocate through a worker; return it running."""
    amqp_url = await new_vhost(stack, admin, tag)
    workdir = new_tempdir(stack, tag)
    database = await new_database(stack, kind, workdir)
    prepared = Prepared(stack, config, amqp_url, database, workdir, agents, Probe(database))
    worker = prepared.spawn()
    await worker.wait_ready()
    await publish(amqp_url, setup_commands(agents))
    expected = (len(agents), len(agents) * ALLOCATION)
    await prepared.probe.wait_for(lambda totals: totals[:2] == expected, within=120)
    return prepared, worker


_LANE_STARTS = frozenset({"partition_taken", "worker_ready"})
_LANE_MARKERS = tuple(f'"{name}"'.encode() for name in sorted(_LANE_STARTS))


def _timestamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


async def drain(
    prepared: Prepared,
    *,
    processes: int,
    backlog: int,
    tag: str,
    during: Callable[[asyncio.Event], Coroutine[Any, Any, Any]] | None = None,
    rss_every: float | None = None,
    supervised: bool = False,
) -> dict[str, Any]:
    """Publish ``backlog`` consumes with no worker running, then time the drain.

    ``during`` runs from the first worker being ready until every command is
    applied (the event is set then); its result is returned under "during".
    """
    _, _, used_before = await prepared.probe.totals()
    publish_rate = await publish(prepared.amqp_url, consume_commands(prepared.agents, backlog, tag))
    workers = [prepared.spawn(None)] if supervised else [prepared.spawn() for _ in range(processes)]
    spawned = time.perf_counter()
    # CPU from the first lane's start on: start-up (imports, migrations,
    # joining the pool) is left out, as the baselines leave out theirs.
    cpu_start = await asyncio.gather(*(_cpu_at_first_lane(worker) for worker in workers))
    await asyncio.gather(*(worker.wait_ready() for worker in workers))
    ready_peaks = [worker.memory_kib("VmHWM") for worker in workers]
    drained = asyncio.Event()
    side = asyncio.create_task(during(drained)) if during is not None else None
    series: list[tuple[float, int | None]] = []
    sampler = (
        asyncio.create_task(_sample_rss(workers[0], drained, rss_every, series))
        if rss_every
        else None
    )
    try:
        target = used_before + backlog
        await prepared.probe.wait_for(
            lambda totals: totals[2] >= target, within=max(180.0, backlog / 100)
        )
    finally:
        drained.set()
        during_result = await side if side is not None else None
        if sampler is not None:
            await sampler
    wall = time.perf_counter() - spawned
    peaks = [worker.memory_kib("VmHWM") for worker in workers]
    cpu = sum(
        (w.cpu_seconds() or 0.0) - (c or 0.0) for w, c in zip(workers, cpu_start, strict=True)
    )
    await asyncio.gather(*(worker.stop() for worker in workers))
    result = _from_logs(workers, backlog)
    result.update(
        {
            "n": backlog,
            "processes": processes,
            "database": prepared.database.kind,
            "wall_s": round(wall, 4),
            "wall_msgs_per_s": round(backlog / wall, 1),
            "cpu_s": round(cpu, 3),
            "cpu_us_per_msg": round(cpu / backlog * 1e6, 1),
            "loadavg": loadavg(),
            "publish_msgs_per_s": round(publish_rate, 1),
            "vmhwm_kib": peaks,
            "vmhwm_ready_kib": ready_peaks,
        }
    )
    if during is not None:
        result["during"] = during_result
    if rss_every:
        result["rss_series"] = [[round(t, 2), kib] for t, kib in series]
    return result


async def _cpu_at_first_lane(worker: WorkerProc) -> float | None:
    await worker.wait_for(_LANE_MARKERS)
    return worker.cpu_seconds()


async def _sample_rss(
    worker: WorkerProc,
    drained: asyncio.Event,
    every: float,
    series: list[tuple[float, int | None]],
) -> None:
    """VmRSS over the drain: a plateau is bounded memory, a slope a leak."""
    started = time.perf_counter()
    while not drained.is_set():
        series.append((time.perf_counter() - started, worker.memory_kib("VmRSS")))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(drained.wait(), every)


def _from_logs(workers: list[WorkerProc], backlog: int) -> dict[str, Any]:
    readies: list[float] = []
    last_batch = 0.0
    per_process = []
    batches = applied = 0
    busy_ms = 0.0
    for worker in workers:
        events = worker.events()
        # Lanes start as the pool takes their partitions, and may apply
        # batches before worker_ready: the drain starts with the first lane.
        starts = [_timestamp(e) for e in events if e.get("event") in _LANE_STARTS]
        done = [e for e in events if e.get("event") == "batch_applied"]
        readies.extend(starts[:1])
        if done:
            last_batch = max(last_batch, max(_timestamp(e) for e in done))
        sizes = sum(int(e.get("size", 0)) for e in done)
        per_process.append(
            {
                "pid": worker.pid,
                "commands": sizes,
                "batches": len(done),
                "lanes": len({e.get("lane") for e in done}),
            }
        )
        batches += len(done)
        applied += sizes
        busy_ms += sum(float(e.get("duration_ms", 0.0)) for e in done)
    seconds = last_batch - min(readies) if readies and last_batch else float("nan")
    return {
        "seconds": round(seconds, 4),
        "msgs_per_s": round(backlog / seconds, 1) if seconds > 0 else None,
        "batches": batches,
        "mean_batch": round(applied / batches, 1) if batches else None,
        "batch_busy_s": round(busy_ms / 1000, 4),
        "per_process": per_process,
    }
