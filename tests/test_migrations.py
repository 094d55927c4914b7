"""The migrations build exactly the schema that worker/store/tables.py declares."""

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine

from token_budget.worker.store.tables import metadata


def _diff(connection: Any) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": False}
    )
    return list(compare_metadata(context, metadata))


async def test_the_migrated_schema_is_the_declared_one(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        differences = await conn.run_sync(_diff)
    assert differences == []
