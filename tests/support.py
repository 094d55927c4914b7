"""Helpers the tests share: isolated vhosts and databases on the real services."""

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import asyncpg

from token_budget.client import BudgetClient

__all__ = [
    "AMQP_HOST",
    "PG_ADMIN_DSN",
    "RabbitAdmin",
    "create_pg_database",
    "drop_pg_database",
    "funded",
    "unique",
]

AMQP_HOST = os.environ.get("BUDGET_TEST_AMQP_HOST", "127.0.0.1:5672")
RABBIT_API = os.environ.get("BUDGET_TEST_RABBIT_API", "http://127.0.0.1:15672/api")
RABBIT_USER = os.environ.get("BUDGET_TEST_RABBIT_USER", "guest")
RABBIT_PASSWORD = os.environ.get("BUDGET_TEST_RABBIT_PASSWORD", "guest")
PG_ADMIN_DSN = os.environ.get("BUDGET_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def funded(client: BudgetClient, tokens: int) -> str:
    """A new agent, registered and allocated ``tokens`` through the SDK."""
    agent = unique("agent")
    await client.register_agent(agent)
    await client.allocate(agent, tokens)
    return agent


class RabbitAdmin:
    """The management HTTP API: vhosts, users and queue counts in milliseconds."""

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

    def missing_prerequisites(self) -> str | None:
        """Why the broker cannot run the tests, with the command that fixes it; or None."""
        enable = (
            "rabbitmq-plugins enable rabbitmq_management rabbitmq_sharding "
            "rabbitmq_consistent_hash_exchange"
        )
        try:
            overview = self.call("GET", "/overview")
        except urllib.error.HTTPError as error:
            return (
                f"RabbitMQ's management API at {self.base} answered {error.code}: check "
                f"BUDGET_TEST_RABBIT_USER/BUDGET_TEST_RABBIT_PASSWORD"
            )
        except OSError as error:  # URLError: refused, unknown host, timeout
            return (
                f"RabbitMQ's management API at {self.base} is unreachable ({error}): the tests "
                f"make their vhosts through it. Start RabbitMQ and run: {enable}"
            )
        types = {kind["name"] for kind in overview.get("exchange_types", [])}
        # x-modulus-hash: the lanes; x-consistent-hash: the upgrade from it (test_routing.py).
        missing = sorted({"x-modulus-hash", "x-consistent-hash"} - types)
        if missing:
            return f"RabbitMQ lacks the exchange types {', '.join(missing)}: run {enable}"
        return None

    def create_vhost(self, name: str, user: str = RABBIT_USER) -> None:
        quoted = urllib.parse.quote(name, safe="")
        self.call("PUT", f"/vhosts/{quoted}", {})
        self.call(
            "PUT",
            f"/permissions/{quoted}/{user}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )

    def delete_vhost(self, name: str) -> None:
        try:
            self.call("DELETE", f"/vhosts/{urllib.parse.quote(name, safe='')}")
        except urllib.error.HTTPError as error:
            if error.code != 404:
                raise

    def queue(self, vhost: str, name: str) -> dict[str, Any]:
        quoted = urllib.parse.quote(vhost, safe="")
        return dict(self.call("GET", f"/queues/{quoted}/{urllib.parse.quote(name, safe='')}"))

    def consumers(self, vhost: str) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/consumers/{urllib.parse.quote(vhost, safe='')}"))

    def amqp_url(self, vhost: str, user: str = RABBIT_USER, password: str = RABBIT_PASSWORD) -> str:
        return f"amqp://{user}:{password}@{AMQP_HOST}/{urllib.parse.quote(vhost, safe='')}"


async def create_pg_database(name: str) -> str:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


async def drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
