"""Isolation and facts: a vhost and a database per scenario, machine and versions.

Every resource is registered on an ``AsyncExitStack`` as soon as it exists, so
a failing or interrupted scenario still deletes its vhost, drops its database
and removes its files.
"""

import asyncio
import base64
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg

__all__ = [
    "AMQP_HOST",
    "PG_ADMIN_DSN",
    "Database",
    "Probe",
    "RabbitAdmin",
    "loadavg",
    "machine_info",
    "new_database",
    "new_tempdir",
    "new_vhost",
    "unique",
    "versions",
]

AMQP_HOST = os.environ.get("BENCH_AMQP_HOST", "127.0.0.1:5672")
RABBIT_API = os.environ.get("BENCH_RABBIT_API", "http://127.0.0.1:15672/api")
RABBIT_USER = os.environ.get("BENCH_RABBIT_USER", "guest")
RABBIT_PASSWORD = os.environ.get("BENCH_RABBIT_PASSWORD", "guest")
PG_ADMIN_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class RabbitAdmin:
    """The few management-API calls the benchmark needs (as tests/support.py)."""

    def __init__(self, base: str = RABBIT_API) -> None:
        self.base = base.rstrip("/")
        token = base64.b64encode(f"{RABBIT_USER}:{RABBIT_PASSWORD}".encode()).decode()
        self._auth = f"Basic {token}"

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base}{path}",
            data=data,
            method=method,
            headers={"Authorization": self._auth, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def create_vhost(self, name: str) -> None:
        quoted = urllib.parse.quote(name, safe="")
        self.call("PUT", f"/vhosts/{quoted}", {})
        self.call(
            "PUT",
            f"/permissions/{quoted}/{urllib.parse.quote(RABBIT_USER, safe='')}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )

    def delete_vhost(self, name: str) -> None:
        try:
            self.call("DELETE", f"/vhosts/{urllib.parse.quote(name, safe='')}")
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise

    def overview(self) -> dict[str, Any]:
        return dict(self.call("GET", "/overview"))

    def amqp_url(self, vhost: str) -> str:
        quoted = urllib.parse.quote(vhost, safe="")
        return f"amqp://{RABBIT_USER}:{RABBIT_PASSWORD}@{AMQP_HOST}/{quoted}"


async def new_vhost(stack: contextlib.AsyncExitStack, admin: RabbitAdmin, prefix: str) -> str:
    """A fresh vhost, deleted (with every queue in it) when ``stack`` closes."""
    name = unique(f"bench-{prefix}")
    await asyncio.to_thread(admin.create_vhost, name)

    async def delete() -> None:
        await asyncio.to_thread(admin.delete_vhost, name)

    stack.push_async_callback(delete)
    return admin.amqp_url(name)


def new_tempdir(stack: contextlib.AsyncExitStack, prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-"))
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path


@dataclass(frozen=True, slots=True)
class Database:
    kind: str  # "sqlite" or "postgresql"
    url: str  # SQLAlchemy URL, as the worker takes it
    dsn: str  # what Probe connects to: a file path or an asyncpg DSN


async def new_database(stack: contextlib.AsyncExitStack, kind: str, workdir: Path) -> Database:
    """An empty database of ``kind``: a temp SQLite file or a PostgreSQL database."""
    if kind == "sqlite":
        path = workdir / "budget.db"
        return Database(kind, f"sqlite+aiosqlite:///{path}", str(path))
    name = unique("bench").replace("-", "_")
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()

    async def drop() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    stack.push_async_callback(drop)
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    url = base.replace("postgresql://", "postgresql+asyncpg://", 1)
    return Database(kind, f"{url}/{name}", f"{base}/{name}")


class Probe:
    """Reads balances beside the worker without taking its write lock.

    SQLite is read with the standard library in a thread (a plain deferred
    read in WAL mode never blocks the writer); PostgreSQL through asyncpg.
    """

    def __init__(self, database: Database) -> None:
        self._database = database

    async def totals(self) -> tuple[int, int, int]:
        """(budget rows, sum of allocated_tokens, sum of used_tokens)."""
        sql = (
            "SELECT count(*), coalesce(sum(allocated_tokens), 0), "
            "coalesce(sum(used_tokens), 0) FROM budgets"
        )
        if self._database.kind == "sqlite":
            return await asyncio.to_thread(self._sqlite, sql)
        conn = await asyncpg.connect(self._database.dsn)
        try:
            row = await conn.fetchrow(sql)
        finally:
            await conn.close()
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    def _sqlite(self, sql: str) -> tuple[int, int, int]:
        try:
            conn = sqlite3.connect(self._database.dsn, timeout=30)
        except sqlite3.Error:
            return 0, 0, 0
        try:
            row = conn.execute(sql).fetchone()
        except sqlite3.OperationalError:  # no such table yet: not migrated
            return 0, 0, 0
        finally:
            conn.close()
        return int(row[0]), int(row[1]), int(row[2])

    async def wait_for(
        self, done: Any, *, within: float, interval: float = 0.1
    ) -> tuple[int, int, int]:
        """Poll until ``done(totals)``; raise TimeoutError with the last totals."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            totals = await self.totals()
            if done(totals):
                return totals
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"database did not reach the expected totals: {totals}")
            await asyncio.sleep(interval)


def loadavg() -> list[float]:
    """1, 5 and 15 minute load: other work on this machine skews every figure."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def _git_state() -> str | None:
    """The commit measured, marked dirty when worker/ or schemas/ has local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "worker", "schemas"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return f"{commit}{' (worker/ or schemas/ modified)' if changed else ''}" or None


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "memory_mib": round(mem_kib / 1024),
        "platform": platform.platform(),
        "loadavg_at_start": loadavg(),
    }


async def versions(admin: RabbitAdmin) -> dict[str, str | None]:
    def package(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    rabbit: str | None = None
    with contextlib.suppress(Exception):
        rabbit = str((await asyncio.to_thread(admin.overview)).get("rabbitmq_version"))
    postgres: str | None = None
    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            postgres = str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()
    return {
        "code": _git_state(),
        "python": platform.python_version(),
        "rabbitmq": rabbit,
        "postgresql": postgres,
        "sqlite": sqlite3.sqlite_version,
        "aio-pika": package("aio-pika"),
        "aiormq": package("aiormq"),
        "sqlalchemy": package("SQLAlchemy"),
        "aiosqlite": package("aiosqlite"),
        "asyncpg": package("asyncpg"),
        "pydantic": package("pydantic"),
    }
