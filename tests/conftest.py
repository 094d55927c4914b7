"""Fixtures: every test gets its own vhost and its own database, on real services.

``database_url`` is parametrized, so each test that uses it runs against
SQLite and PostgreSQL.
"""

from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support import RabbitAdmin, create_pg_database, drop_pg_database, unique
from worker.db import create_engine
from worker.migrate import upgrade


@pytest.fixture(scope="session")
def rabbit() -> RabbitAdmin:
    return RabbitAdmin()


@pytest.fixture
def vhost(rabbit: RabbitAdmin) -> Iterator[str]:
    name = unique("budget-test")
    rabbit.create_vhost(name)
    yield name
    rabbit.delete_vhost(name)


@pytest.fixture
def amqp_url(rabbit: RabbitAdmin, vhost: str) -> str:
    return rabbit.amqp_url(vhost)


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
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
