"""Real worker processes for tests that kill, pause and restart them."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.eventually import eventually

__all__ = ["WorkerProcess"]

_ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """``python -m token_budget.worker`` with JSON logs in a file the test can read."""

    def __init__(
        self, log_path: Path, *, module: str = "token_budget.worker", **settings: Any
    ) -> None:
        self.log_path = log_path
        self.module = module
        self.env = {
            **os.environ,
            "BUDGET_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
            **{f"BUDGET_{key.upper()}": str(value) for key, value in settings.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> "WorkerProcess":
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=self.env,
            cwd=_ROOT,
            stdout=log,
            stderr=log,
        )
        log.close()
        return self

    def events(self) -> list[dict[str, Any]]:
        """Log events written since the last start."""
        if not self.log_path.exists():
            return []
        with self.log_path.open("rb") as handle:
            handle.seek(self._log_offset)
            lines = handle.read().decode(errors="replace").splitlines()
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                events.append({"event": "raw", "line": line})
        return events

    async def wait_for_event(self, name: str, within: float = 30.0) -> dict[str, Any]:
        """The first ``name`` event since the last start, once it is logged.

        Fails at once if the process exits first; either failure shows the log's tail.
        """

        def logged() -> dict[str, Any] | None:
            found = next((e for e in self.events() if e.get("event") == name), None)
            if found is None and self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode} before {name!r}")
            return found

        try:
            event = await eventually(logged, within=within, what=f"the worker's {name!r}")
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.tail()}") from None
        assert event is not None
        return event

    async def wait_ready(self, within: float = 60.0) -> dict[str, Any]:
        """Its ``worker_ready`` event (which names its ``worker_id``), once logged."""
        return await self.wait_for_event("worker_ready", within)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def tail(self, lines: int = 15) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
