"""Engines with the durability this service promises, and error classification."""

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from token_budget.worker.backoff import RetryPolicy, pause

__all__ = [
    "create_engine",
    "create_reader",
    "is_sqlite",
    "is_transient",
    "retry_while_transient",
    "sqlite_path",
]

#: SQLSTATEs that a retry of the same transaction can cure.
_TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",
        "40P01",
        "55P03",
        "57P01",
        "57P02",
        "57P03",
        "08000",
        "08003",
        "08006",
        "08001",
        "08004",
        "53300",
    }
)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL names; None for another database or ``:memory:``."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def create_engine(
    url: str,
    *,
    pool_size: int = 5,
    echo: bool = False,
    application_name: str = "budget-worker",
    pool_timeout: float = 30.0,
) -> AsyncEngine:
    """An engine whose commits are durable before they return.

    SQLite: WAL with ``synchronous=FULL`` and ``BEGIN IMMEDIATE``, so a batch
    takes the write lock before it reads the balances it will change.
    PostgreSQL: ``synchronous_commit=on`` whatever the server's default.
    """
    path = sqlite_path(url)
    if path is not None:
        # The default lives in the user's data directory (worker/settings.py),
        # which may not exist yet: the worker makes it, budgetctl never does.
        path.parent.mkdir(parents=True, exist_ok=True)
    if is_sqlite(url):
        engine = create_async_engine(
            url,
            echo=echo,
            # One connection per process: SQLite has one writer anyway, and
            # lanes queueing in the pool is cheaper than busy-waiting on a lock.
            pool_size=1,
            max_overflow=0,
            pool_timeout=300,
            connect_args={"timeout": 30},
        )
        _configure_sqlite(engine)
        return engine
    return create_async_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=pool_timeout,
        pool_pre_ping=True,
        connect_args={
            "server_settings": {
                "synchronous_commit": "on",
                "application_name": application_name,
                # A worker frozen inside a transaction (SIGSTOP, a cut
                # network) must not hold its locks, and so its partitions,
                # for ever: the server ends such a session after 5 s.
                "idle_in_transaction_session_timeout": "5000",
            }
        },
    )


def create_reader(
    url: str, *, pool_size: int = 2, application_name: str = "budget-worker"
) -> AsyncEngine:
    """An engine for reads that must not wait for writers (committed queries).

    SQLite: connections of its own, in WAL read mode (no ``BEGIN IMMEDIATE``,
    ``query_only``), so a read never queues behind a batch holding the write
    lock. PostgreSQL: read-only sessions (MVCC readers never wait for writers).
    """
    if is_sqlite(url):
        engine = create_async_engine(
            url, pool_size=pool_size, max_overflow=0, connect_args={"timeout": 30}
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _read_only(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA query_only=ON")
            cursor.close()

        return engine
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=0,
        pool_pre_ping=True,
        connect_args={
            "server_settings": {
                "default_transaction_read_only": "on",
                "application_name": application_name,
                "idle_in_transaction_session_timeout": "5000",
            }
        },
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the sqlite3 module (see SQLAlchemy's
        # "sqlite_transactions" notes) so that BEGIN IMMEDIATE below is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # The busy timeout first: switching a new file to WAL takes a lock,
        # and without it a second process starting at once fails at once.
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def is_transient(error: BaseException) -> bool:
    """True when retrying the same work later may succeed (outage, lock, timeout).

    False for errors the data itself causes (constraint, type, value), which a
    retry of the same command would only repeat.
    """
    if isinstance(error, exc.IntegrityError | exc.DataError | exc.ProgrammingError):
        return False
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated:
            return True
        sqlstate = getattr(error.orig, "sqlstate", None) or getattr(error.orig, "pgcode", None)
        if sqlstate is not None and str(sqlstate) in _TRANSIENT_SQLSTATES:
            return True
        return isinstance(error, exc.OperationalError | exc.InterfaceError)
    return isinstance(
        error, exc.TimeoutError | exc.DisconnectionError | OSError | ConnectionError | TimeoutError
    )


async def retry_while_transient(
    step: Callable[[], Awaitable[None]],
    *,
    stop: asyncio.Event,
    on_retry: Callable[[BaseException, float], None],
    retry: RetryPolicy,
) -> None:
    """Run ``step`` until it succeeds, backing off while the database is away.

    A non-transient error, or a transient one once ``stop`` is set, is raised.
    """
    backoff = retry.backoff()
    while True:
        try:
            await step()
            return
        except Exception as error:
            if not is_transient(error) or stop.is_set():
                raise
            delay = backoff.next()
            on_retry(error, delay)
        await pause(delay, stop)
