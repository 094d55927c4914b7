"""Run the Alembic migrations, safely when several workers start at once."""

import asyncio
import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["current_revision", "head_revision", "upgrade"]

_SCRIPTS = Path(__file__).parent / "migrations"
#: Any fixed number: the key of the PostgreSQL advisory lock migrations hold.
_PG_LOCK_KEY = 0x42554447
#: Alembic keeps its migration context in module globals (``alembic.context``,
#: ``alembic.op``): two upgrades interleaved in one process, as greenlets of
#: one event loop or threads, would run each other's steps. One at a time.
_IN_PROCESS = threading.Lock()


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the schema inside one transaction that holds the database's lock.

    SQLite: the engine begins with ``BEGIN IMMEDIATE``, so a second process
    waits and then finds the schema current. PostgreSQL: an advisory lock.
    """
    # Polled, not waited on: blocking the loop would block the holder too,
    # and a cancelled wait must not take the lock after its caller has gone.
    while not _IN_PROCESS.acquire(blocking=False):  # noqa: ASYNC110 (a thread lock has no Event)
        await asyncio.sleep(0.05)
    try:
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                await conn.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY}
                )
            await conn.run_sync(_upgrade, revision)
    finally:
        _IN_PROCESS.release()


def _upgrade(connection: Any, revision: str) -> None:
    config = _config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda sync_conn: MigrationContext.configure(sync_conn).get_current_revision()
        )
