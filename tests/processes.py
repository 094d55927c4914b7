"""Real worker processes for tests that kill, pause and restart them."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["WorkerProcess"]

_ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    """``python -m token_budget.worker`` with JSON logs in a file the test can read."""

    def __init__(self, log_path: Path, **settings: Any) -> None:
        self.log_path = log_path
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
            [sys.executable, "-m", "token_budget.worker"],
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

    def wait_for_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == name:
                    return event
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"no {name!r} within {timeout}s: {self.tail()}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_for_event("worker_ready", timeout)

    async def ready(self, within: float = 60.0) -> None:
        """``wait_ready`` without blocking the event loop."""
        await asyncio.to_thread(self.wait_for_event, "worker_ready", within)

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
