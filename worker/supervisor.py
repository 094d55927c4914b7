"""``budget-worker --processes N``: every core from one command.

The parent runs N single-process workers (``python -m token_budget.worker``
with ``BUDGET_PROCESSES=1``) and does nothing else. They share the lanes
through the pool exactly as workers on several hosts do, so no guarantee
depends on the parent. A child that dies is restarted after a backoff (reset
once a child has run ``stable_seconds``); one that exits 1 or 64 (a
configuration the broker or database refuses, a usage error) would fail
again, so the parent stops the others and exits with that code. SIGTERM or
SIGINT is passed to every child, which drains its batch in hand; the parent
exits once all have. On Linux a child also gets SIGTERM if the parent dies
(``PR_SET_PDEATHSIG``), so a killed parent leaves no orphan holding lanes.
"""

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time

from prometheus_client import multiprocess
from structlog.typing import FilteringBoundLogger

from token_budget.worker.backoff import RetryPolicy, pause
from token_budget.worker.exitcodes import ExitCode

__all__ = ["Supervisor", "default_processes"]

#: prctl(2) option: the signal a child gets when its parent dies.
_PR_SET_PDEATHSIG = 1
#: Child exits that a restart cannot fix.
_FATAL = frozenset({int(ExitCode.REFUSED), int(ExitCode.USAGE)})


def default_processes() -> int:
    """One worker process per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _die_with_parent(parent: int) -> None:
    # Runs in the child between fork and exec.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(int(ExitCode.UNREACHABLE))


class Supervisor:
    """Keeps ``processes`` worker processes running until stopped."""

    def __init__(
        self,
        processes: int,
        *,
        retry: RetryPolicy,
        log: FilteringBoundLogger,
        stable_seconds: float = 30.0,
        metrics_dir: str | None = None,
    ) -> None:
        """``metrics_dir``: the children's prometheus-client multiprocess
        directory (the parent serves their sum); None: children keep theirs."""
        self.processes = processes
        self._metrics_dir = metrics_dir
        self._retry = retry
        self._log = log.bind(supervisor=os.getpid())
        self._stable = stable_seconds
        self._stop = asyncio.Event()
        self._children: dict[int, asyncio.subprocess.Process] = {}
        self._fatal: int | None = None
        #: Children started so far (restarts included), for logs and tests.
        self.started = 0

    def stop(self) -> None:
        """Drain every child (SIGTERM), then return from ``run``."""
        self._stop.set()
        for child in self._children.values():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    async def run(self) -> int:
        self._log.info("supervisor_started", processes=self.processes)
        slots = [
            asyncio.create_task(self._keep(slot), name=f"child-{slot}")
            for slot in range(self.processes)
        ]
        await asyncio.gather(*slots)
        self._log.info("supervisor_stopped", started=self.started)
        return self._fatal if self._fatal is not None else int(ExitCode.OK)

    async def _keep(self, slot: int) -> None:
        backoff = self._retry.backoff()
        while not self._stop.is_set():
            began = time.monotonic()
            child = await self._spawn()
            self._children[slot] = child
            self.started += 1
            self._log.info("child_started", slot=slot, pid=child.pid)
            code = await child.wait()
            del self._children[slot]
            if self._metrics_dir is not None and child.pid is not None:
                # Its gauges leave the sum; its counters stay in the totals.
                multiprocess.mark_process_dead(child.pid, self._metrics_dir)  # type: ignore[no-untyped-call]
            if self._stop.is_set():
                self._log.info("child_stopped", slot=slot, pid=child.pid, code=code)
                return
            if code in _FATAL:
                self._log.error("child_refused", slot=slot, pid=child.pid, code=code)
                self._fatal = code
                self.stop()
                return
            if time.monotonic() - began >= self._stable:
                backoff.reset()
            delay = backoff.next()
            self._log.error("child_died", slot=slot, pid=child.pid, code=code, restart_in_s=delay)
            await pause(delay, self._stop)

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = dict(os.environ, BUDGET_PROCESSES="1")
        # The port is the parent's; the children write their metrics for it to sum.
        env.pop("BUDGET_METRICS_PORT", None)
        if self._metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir
        parent = os.getpid()
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "token_budget.worker",
            "run",
            env=env,
            preexec_fn=lambda: _die_with_parent(parent),
        )
