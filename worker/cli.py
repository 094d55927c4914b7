"""``budget-worker``: run the worker, run migrations, or check health (exit code).

Exit codes are ``worker/exitcodes.py``'s: a configuration the broker or the
database refuses (a wrong login, another topology) exits 1 at once, because
retrying it cannot help; an outage is retried while running, and is 2 for
``--check``.
"""

import asyncio
import logging
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from aiormq.exceptions import ProbableAuthenticationError
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from sqlalchemy import text

from token_budget.worker.app import Worker, connect_amqp
from token_budget.worker.endpoint import Endpoint, HealthReport, children_health
from token_budget.worker.errors import BrokerRefused, TopologyError
from token_budget.worker.exitcodes import EPILOG, ExitCode, UsageParser
from token_budget.worker.logs import configure_logging, get_logger
from token_budget.worker.settings import Settings
from token_budget.worker.store.db import create_engine, is_transient
from token_budget.worker.store.migrate import current_revision, head_revision, upgrade
from token_budget.worker.supervisor import Supervisor, default_processes
from token_budget.worker.urls import redact_url

__all__ = ["check", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = UsageParser(
        prog="budget-worker",
        description="Apply agents' token-budget commands from RabbitMQ to the database.",
        epilog="Configuration comes from BUDGET_* environment variables (see README). " + EPILOG,
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check that RabbitMQ and the database are reachable and the schema is current; "
        "exit 0 if so, 2 if one is unreachable, 1 if one refuses (login, schema)",
    )
    parser.add_argument(
        "--processes",
        type=_at_least_one,
        default=None,
        metavar="N",
        help="worker processes to run, sharing the lanes (default: BUDGET_PROCESSES, "
        "else one per CPU); 1 runs the worker in this process",
    )
    parser.add_argument("command", nargs="?", choices=["run", "migrate"], default="run")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    processes = args.processes or settings.processes or default_processes()
    if args.check:
        return asyncio.run(check(settings))
    if args.command == "migrate":
        return asyncio.run(_migrate(settings))
    if processes > 1:
        return asyncio.run(_supervise(settings, processes))
    try:
        asyncio.run(_run(settings))
    except (TopologyError, BrokerRefused) as error:
        print(f"budget-worker: {error}", file=sys.stderr)
        return ExitCode.REFUSED
    except KeyboardInterrupt:
        return 130
    return ExitCode.OK


async def _run(settings: Settings) -> None:
    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    endpoint = None
    if settings.metrics_port is not None:
        endpoint = _endpoint(settings, REGISTRY, lambda: worker.health)
    try:
        await worker.run()
    finally:
        if endpoint is not None:
            endpoint.close()


def _endpoint(
    settings: Settings, registry: CollectorRegistry, health: Callable[[], HealthReport | None]
) -> Endpoint:
    assert settings.metrics_port is not None
    endpoint = Endpoint(
        settings.metrics_host,
        settings.metrics_port,
        registry,
        health,
        stale_after=settings.health_stale_after,
    ).start()
    get_logger().info("metrics_serving", host=settings.metrics_host, port=endpoint.port)
    return endpoint


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


async def _supervise(settings: Settings, processes: int) -> int:
    if settings.metrics_port is None:
        return await _supervised(Supervisor(processes, retry=settings.retry, log=get_logger()))
    # The children's values, one file per process, summed here on each scrape.
    with tempfile.TemporaryDirectory(prefix="budget-metrics-") as directory:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        stale_after = settings.health_stale_after
        endpoint = _endpoint(
            settings, registry, lambda: children_health(registry, processes, stale_after)
        )
        try:
            supervisor = Supervisor(
                processes, retry=settings.retry, log=get_logger(), metrics_dir=directory
            )
            return await _supervised(supervisor)
        finally:
            endpoint.close()


async def _supervised(supervisor: Supervisor) -> int:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, supervisor.stop)
    return await supervisor.run()


async def _migrate(settings: Settings) -> int:
    url = settings.database_url.get_secret_value()
    engine = create_engine(url)
    try:
        await upgrade(engine)
        revision = await current_revision(engine)
    except Exception as error:
        # One line a person can act on, not a traceback: 2 may pass with
        # time (the database is down), 1 will not (a refusal of the schema).
        transient = is_transient(error)
        hint = "retry once it is up" if transient else "the database refused the migration"
        reason = (str(getattr(error, "orig", None) or error).splitlines() or [repr(error)])[0]
        if password := urlsplit(url).password:
            reason = reason.replace(password, "***")
        print(f"budget-worker migrate: {redact_url(url)}: {reason}: {hint}", file=sys.stderr)
        return ExitCode.UNREACHABLE if transient else ExitCode.REFUSED
    finally:
        await engine.dispose()
    get_logger().info("migrated", revision=revision)
    return ExitCode.OK


async def check(settings: Settings) -> int:
    """Print one line per dependency; 0 when all are healthy, else the worst
    of 2 (unreachable) and 1 (refused: a wrong login, a schema behind)."""
    failures: set[ExitCode] = set()
    # Each failure is reported once, in its line below: not again by aiormq.
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    amqp = redact_url(settings.amqp_url.get_secret_value())
    try:
        connection = await asyncio.wait_for(
            connect_amqp(settings, name="budget-worker --check"), 10
        )
        await connection.close()
        print(f"rabbitmq: ok ({amqp})")
    except ProbableAuthenticationError as error:
        failures.add(ExitCode.REFUSED)
        print(f"rabbitmq: login refused ({amqp}): {error}: check the user and password")
    except Exception as error:
        failures.add(ExitCode.UNREACHABLE)
        print(f"rabbitmq: unreachable ({amqp}): {error!r}")
    database = redact_url(settings.database_url.get_secret_value())
    engine = create_engine(settings.database_url.get_secret_value())
    try:
        async with asyncio.timeout(10):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            revision = await current_revision(engine)
        head = head_revision()
        if revision == head:
            print(f"database: ok ({database}, schema {revision})")
        elif settings.migrate_on_start:
            print(f"database: ok ({database}, schema {revision}; the worker migrates to {head})")
        else:
            failures.add(ExitCode.REFUSED)
            print(f"database: schema {revision}, expected {head}: run `budget-worker migrate`")
    except Exception as error:
        failures.add(ExitCode.UNREACHABLE)
        print(f"database: unreachable ({database}): {str(error).splitlines()[0][:300]}")
    finally:
        await engine.dispose()
    # Unreachable wins: once it is reachable, the refusal (if any) shows.
    return max(failures, default=ExitCode.OK)
