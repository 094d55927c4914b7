"""Fixtures: every test gets its own vhost and its own database, on real services.

``database_url`` is parametrized, so each test that uses it runs against
SQLite and PostgreSQL; ``@pytest.mark.sqlite_only`` or
``@pytest.mark.postgresql_only`` runs it against that one alone. Every AMQP
connection a test opens is named after the test (``amqp_connection_name``).
"""

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import hypothesis
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.amqp_helpers import TEST_ID, connection_name
from tests.inprocess import running
from tests.processes import WorkerProcess
from tests.support import RabbitAdmin, create_pg_database, drop_pg_database, unique
from token_budget.client import BudgetClient
from token_budget.worker.app import Worker
from token_budget.worker.logs import configure_logging
from token_budget.worker.settings import LogFormat, Settings
from token_budget.worker.store.db import create_engine
from token_budget.worker.store.migrate import upgrade

configure_logging("info", LogFormat.CONSOLE)

# Every worker process a test starts is one worker, as before `--processes`:
# tests that kill "the worker" kill it, not a supervisor. Tests of the
# supervisor ask for more explicitly.
os.environ["BUDGET_PROCESSES"] = "1"

# CI (HYPOTHESIS_PROFILE=ci, set by .ci/run) derandomizes: the same examples on
# every run, so a failure cannot pass on a lucky rerun. At a desk, examples are
# random and failures are kept in .hypothesis/ to be replayed first.
hypothesis.settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
hypothesis.settings.register_profile("dev", deadline=None)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


#: The databases a test that uses ``database_url`` runs against.
DATABASES = ("sqlite", "postgresql")
#: marker -> the one database a test so marked runs against.
ONLY = {f"{name}_only": name for name in DATABASES}


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each test that uses ``database_url`` runs once per database in ``DATABASES``,
    or only on the one its ``sqlite_only``/``postgresql_only`` marker names.

    Whatever ``reason=`` such a marker gives says why, for the reader.
    """
    wanted = {ONLY[m.name] for m in metafunc.definition.iter_markers() if m.name in ONLY}
    where = metafunc.definition.nodeid
    if len(wanted) > 1:
        raise pytest.UsageError(f"{where}: marked for more than one database only")
    if "database_url" not in metafunc.fixturenames:
        if wanted:
            raise pytest.UsageError(f"{where}: marked for one database, but uses no database_url")
        return
    metafunc.parametrize("database_url", sorted(wanted) or list(DATABASES), indirect=True)


@pytest.fixture(autouse=True)
def amqp_connection_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """This test's node id: the name of every AMQP connection it opens, so that a
    connection it leaks names it in the management UI."""
    token = TEST_ID.set(request.node.nodeid)
    yield request.node.nodeid
    TEST_ID.reset(token)


@pytest.fixture(scope="session")
def rabbit() -> RabbitAdmin:
    """The management API, checked once: without it no test can make its vhost."""
    admin = RabbitAdmin()
    problem = admin.missing_prerequisites()
    if problem is not None:
        pytest.exit(problem, returncode=pytest.ExitCode.USAGE_ERROR)
    return admin


@pytest.fixture
def vhost(rabbit: RabbitAdmin) -> Iterator[str]:
    name = unique("budget-test")
    rabbit.create_vhost(name)
    yield name
    rabbit.delete_vhost(name)


@pytest.fixture
def amqp_url(rabbit: RabbitAdmin, vhost: str) -> str:
    return rabbit.amqp_url(vhost)


@pytest.fixture
async def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("db") / "budget.db"
        yield f"sqlite+aiosqlite:///{path}"
        return
    name = unique("budget_test").replace("-", "_")
    url = await create_pg_database(name)
    yield url
    await drop_pg_database(name)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    await upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def worker_settings(amqp_url: str, database_url: str) -> Settings:
    return Settings(
        amqp_url=SecretStr(amqp_url),
        database_url=SecretStr(database_url),
        partitions=4,
        retry_max_seconds=1.0,
        log_format=LogFormat.CONSOLE,
    )


@pytest.fixture
async def worker(worker_settings: Settings) -> AsyncIterator[Worker]:
    """A worker running in this test's event loop, ready to take commands."""
    started = Worker(worker_settings)
    async with running(started):
        yield started


@pytest.fixture
async def client(worker: Worker, amqp_url: str) -> AsyncIterator[BudgetClient]:
    """The SDK, connected to the running ``worker``'s vhost."""
    async with BudgetClient.connect(amqp_url, timeout=20, name=connection_name()) as connected:
        yield connected


@pytest.fixture
def worker_process(
    tmp_path: Path, amqp_url: str, database_url: str
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real ``python -m token_budget.worker`` processes; all are stopped at the end."""
    started: list[WorkerProcess] = []

    def start(module: str = "token_budget.worker", **overrides: object) -> WorkerProcess:
        settings: dict[str, object] = {
            "amqp_url": amqp_url,
            "database_url": database_url,
            "partitions": 4,
            "retry_max_seconds": 1.0,
            **overrides,
        }
        log = tmp_path / f"worker-{len(started)}.log"
        process = WorkerProcess(log, module=module, **settings).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
