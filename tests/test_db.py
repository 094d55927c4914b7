"""The engine's durability settings, and which errors count as transient."""

from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import AsyncEngine

from token_budget.worker.store.db import is_transient
from token_budget.worker.urls import redact_url


async def test_commits_are_durable_before_they_return(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == 2  # FULL
        else:
            # synchronous_commit waits for the WAL flush; fsync and full pages
            # make that flush survive a power cut.
            for setting in ("synchronous_commit", "fsync", "full_page_writes"):
                assert (await conn.execute(text(f"SHOW {setting}"))).scalar() == "on", setting


def test_constraint_errors_are_not_transient() -> None:
    error = exc.IntegrityError("INSERT", {}, Exception("duplicate key"))
    assert not is_transient(error)


def test_lost_connections_and_timeouts_are_transient() -> None:
    assert is_transient(exc.OperationalError("SELECT 1", {}, Exception("database is locked")))
    assert is_transient(ConnectionRefusedError())
    assert is_transient(TimeoutError())


def test_passwords_never_reach_the_log() -> None:
    redacted = redact_url("postgresql+asyncpg://budget:s3cret@db:5432/budget")
    assert "s3cret" not in redacted
    assert redacted == "postgresql+asyncpg://budget:***@db:5432/budget"
