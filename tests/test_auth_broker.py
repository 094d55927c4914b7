"""BUDGET_AUTH=user-id against the real broker, real RabbitMQ users and the worker.

Each test creates its own broker users (an admin and two agents, named uniquely
so that concurrent runs never share one) and deletes them afterwards. Agents'
users may publish commands and read their own reply queues, nothing else.
"""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from prometheus_client import REGISTRY
from sqlalchemy import select

from tests.amqp_helpers import Collector, command, connect, connection_name, open_amqp
from tests.db_helpers import balances, processed_ids, reader
from tests.eventually import eventually
from tests.inprocess import running
from tests.support import RabbitAdmin, unique
from tests.test_ctl import run_ctl
from token_budget.client import BudgetClient, UnauthorizedError
from token_budget.schemas import (
    COMMANDS_EXCHANGE,
    CONTENT_TYPE,
    DEAD_LETTER_QUEUE,
    ErrorReply,
    OkReply,
    RefusedEvent,
    Reply,
    parse_reply,
)
from token_budget.worker.app import Worker
from token_budget.worker.settings import AuthMode, Settings
from token_budget.worker.store.tables import reservations

PASSWORD = uuid.uuid4().hex
#: Pass as ``user_id`` to publish without one.
NO_USER_ID = object()


@dataclass(frozen=True)
class Users:
    admin: str
    agent_a: str
    agent_b: str


@pytest.fixture
def users(rabbit: RabbitAdmin, vhost: str) -> Iterator[Users]:
    names = Users(unique("admin"), unique("agent-a"), unique("agent-b"))
    created: list[str] = []
    try:
        for name in (names.admin, names.agent_a, names.agent_b):
            rabbit.call("PUT", f"/users/{quote(name, safe='')}", {"password": PASSWORD, "tags": ""})
            created.append(name)
            # What docs/protocol.md (§11) recommends: publish commands, own
            # server-named reply queues, nothing else.
            rabbit.call(
                "PUT",
                f"/permissions/{quote(vhost, safe='')}/{quote(name, safe='')}",
                {
                    "configure": "^amq\\.gen-.*",
                    "write": "^budget\\.commands$",
                    "read": "^amq\\.gen-.*",
                },
            )
        yield names
    finally:
        for name in created:
            rabbit.call("DELETE", f"/users/{quote(name, safe='')}")


@dataclass
class AuthWorker:
    worker: Worker
    task: "asyncio.Task[None]"

    async def stop(self) -> None:
        """Stop and wait: every delivery not acknowledged goes back to its queue."""
        self.worker.stop()
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def auth_worker(worker_settings: Settings, users: Users) -> AsyncIterator[AuthWorker]:
    settings = worker_settings.model_copy(
        update={
            "auth": AuthMode.USER_ID,
            "admin_users": [users.admin],
            # Fast sweeps, for the test of the workers' own internal commands.
            "reservation_sweep_interval": 0.2,
        }
    )
    worker = Worker(settings)
    async with running(worker) as [task]:
        yield AuthWorker(worker, task)


@dataclass
class Session:
    """One broker user's connection: publishes commands, reads its replies."""

    user: str
    connection: AbstractConnection
    channel: AbstractChannel
    commands: AbstractExchange
    reply_to: str
    replies: Collector

    async def send(
        self,
        type_: str,
        agent: str,
        tokens: int | None = None,
        *,
        message_id: str | None = None,
        user_id: Any = None,
        reply: bool = True,
        fields: dict[str, Any] | None = None,
    ) -> str:
        """Publish (confirmed); ``user_id`` defaults to this session's user."""
        correlation_id = uuid.uuid4().hex
        body = {**json.loads(command(type_, agent, tokens)), **(fields or {})}
        message = aio_pika.Message(
            json.dumps(body).encode(),
            message_id=message_id or uuid.uuid4().hex,
            correlation_id=correlation_id,
            reply_to=self.reply_to if reply else None,
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=None if user_id is NO_USER_ID else (user_id or self.user),
        )
        await self.commands.publish(message, routing_key=agent)
        return correlation_id

    async def ask(self, type_: str, agent: str, tokens: int | None = None, **options: Any) -> Reply:
        correlation_id = await self.send(type_, agent, tokens, **options)
        return parse_reply((await self.replies.reply(correlation_id)).body)


@asynccontextmanager
async def session(
    rabbit: RabbitAdmin, vhost: str, user: str | None = None
) -> AsyncIterator[Session]:
    """``user``'s session, or guest's if None."""
    url = rabbit.amqp_url(vhost) if user is None else rabbit.amqp_url(vhost, user, PASSWORD)
    connection = await connect(url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        commands = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        replies = Collector()
        await queue.consume(replies.on_message, no_ack=True)
        yield Session(user or "guest", connection, channel, commands, queue.name, replies)
    finally:
        await connection.close()


async def fund(rabbit: RabbitAdmin, vhost: str, users: Users, tokens: int) -> None:
    """The admin registers both agents and allocates ``tokens`` to each."""
    async with session(rabbit, vhost, users.admin) as admin:
        for agent in (users.agent_a, users.agent_b):
            assert (await admin.ask("register_agent", agent)).ok
            assert (await admin.ask("allocate", agent, tokens)).ok


def tokens(reply: Reply) -> tuple[str, int | None, int | None, int | None]:
    assert isinstance(reply, OkReply), reply
    return reply.agent_id, reply.allocated_tokens, reply.used_tokens, reply.available_tokens


def unauthorized(reply: Reply) -> bool:
    return isinstance(reply, ErrorReply) and reply.error.code == "unauthorized"


async def test_admin_funds_agents_and_each_agent_consumes_its_own_budget(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users, database_url: str
) -> None:
    await fund(rabbit, vhost, users, 100)
    async with session(rabbit, vhost, users.agent_a) as agent_a:
        consumed = await agent_a.ask("consume", users.agent_a, 30)
        available = await agent_a.ask("get_available", users.agent_a)

    assert tokens(consumed) == (users.agent_a, 100, 30, 70)
    assert available == consumed
    async with reader(database_url) as engine:
        assert await balances(engine) == {users.agent_a: (100, 30), users.agent_b: (100, 0)}


async def test_agent_cannot_spend_another_agents_tokens(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users, database_url: str
) -> None:
    await fund(rabbit, vhost, users, 100)
    async with session(rabbit, vhost, users.agent_a) as agent_a:
        # Routing key, agent_id and a broker-validated user_id: all consistent,
        # and still not agent-a's budget to spend.
        stolen = await agent_a.ask("consume", users.agent_b, 60, message_id="steal-1")
    async with session(rabbit, vhost, users.agent_b) as agent_b:
        after = await agent_b.ask("get_budget", users.agent_b)

    assert unauthorized(stolen)
    assert tokens(after) == (users.agent_b, 100, 0, 100)
    async with reader(database_url) as engine:
        assert (await balances(engine))[users.agent_b] == (100, 0)
        assert "steal-1" not in await processed_ids(engine)


async def test_an_unauthorized_command_is_counted_as_such_in_the_metrics(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users
) -> None:
    # The in-process worker counts in this process's registry: compare before and after.
    labels = {"type": "consume", "outcome": "unauthorized"}

    def counted() -> float:
        return REGISTRY.get_sample_value("budget_commands_total", labels) or 0.0

    before = counted()
    await fund(rabbit, vhost, users, 100)
    async with session(rabbit, vhost, users.agent_a) as agent_a:
        assert unauthorized(await agent_a.ask("consume", users.agent_b, 60))
    await eventually(counted, within=10, what="counted", done=lambda n: n == before + 1)


async def test_unauthorized_command_leaves_its_message_id_unused(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users
) -> None:
    await fund(rabbit, vhost, users, 100)
    async with session(rabbit, vhost, users.agent_a) as agent_a:
        first = await agent_a.ask("consume", users.agent_b, 10, message_id="shared-id")
    async with session(rabbit, vhost, users.agent_b) as agent_b:
        # The same command, from its rightful user: applied, not a duplicate
        # of the refusal nor a conflict with it.
        second = await agent_b.ask("consume", users.agent_b, 10, message_id="shared-id")

    assert unauthorized(first)
    assert tokens(second) == (users.agent_b, 100, 10, 90)


@pytest.mark.sqlite_only
async def test_agent_cannot_read_another_agents_budget(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users
) -> None:
    await fund(rabbit, vhost, users, 100)
    async with session(rabbit, vhost, users.agent_a) as agent_a:
        replies = [
            await agent_a.ask(kind, users.agent_b) for kind in ("get_budget", "get_available")
        ]

    assert all(unauthorized(reply) for reply in replies), replies


@pytest.mark.sqlite_only
async def test_agent_cannot_allocate_even_to_itself(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users, database_url: str
) -> None:
    await fund(rabbit, vhost, users, 100)
    async with session(rabbit, vhost, users.agent_a) as agent_a:
        reply = await agent_a.ask("allocate", users.agent_a, 1000)

    assert unauthorized(reply)
    assert isinstance(reply, ErrorReply) and "only admin users" in reply.error.message
    async with reader(database_url) as engine:
        assert (await balances(engine))[users.agent_a] == (100, 0)


@pytest.mark.sqlite_only
async def test_command_without_user_id_is_unauthorized(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users
) -> None:
    # guest, the worker's own user, is in no admin list here.
    async with session(rabbit, vhost) as guest:
        refused = await guest.ask("register_agent", users.agent_a, user_id=NO_USER_ID)
    async with session(rabbit, vhost, users.admin) as admin:
        never_registered = await admin.ask("get_budget", users.agent_a)

    assert unauthorized(refused)
    assert isinstance(never_registered, ErrorReply)
    assert never_registered.error.code == "agent_not_found"


@pytest.mark.sqlite_only
async def test_user_id_of_another_user_is_refused_by_the_broker(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users
) -> None:
    async with session(rabbit, vhost, users.agent_a) as agent_a:
        # RabbitMQ 3.10 answers PRECONDITION_FAILED (406), closing the channel.
        with pytest.raises(
            aiormq.exceptions.ChannelPreconditionFailed, match="user_id property set to"
        ):
            await agent_a.send("consume", users.agent_b, 1, user_id=users.agent_b)
        assert agent_a.channel.is_closed
        assert not agent_a.connection.is_closed


@pytest.mark.sqlite_only
async def test_unauthorized_fire_and_forget_command_is_announced_as_an_event(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users, amqp_url: str
) -> None:
    await fund(rabbit, vhost, users, 100)
    async with open_amqp(amqp_url) as observer:
        events = await observer.bind_events("budget.refused.#")
        async with session(rabbit, vhost, users.agent_a) as agent_a:
            await agent_a.send("consume", users.agent_b, 5, message_id="quiet-1", reply=False)
        [event] = await events.wait_count(1)

    assert event.routing_key == "budget.refused.unauthorized"
    refused = RefusedEvent.model_validate_json(event.body)
    assert (refused.agent_id, refused.command_type, refused.message_id, refused.tokens) == (
        users.agent_b,
        "consume",
        "quiet-1",
        5,
    )
    assert refused.error.code == "unauthorized"


@pytest.mark.sqlite_only
async def test_unauthorized_command_is_acknowledged_not_dead_lettered(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users, amqp_url: str
) -> None:
    await fund(rabbit, vhost, users, 100)
    async with session(rabbit, vhost, users.agent_a) as agent_a:
        assert unauthorized(await agent_a.ask("consume", users.agent_b, 5))
    # Stopping returns every unacknowledged delivery to its lane queue.
    await auth_worker.stop()
    async with open_amqp(amqp_url) as observer:
        backlog = await observer.lane_backlog(auth_worker.worker.topology.partitions)
        dead_letters = await observer.ready_count(DEAD_LETTER_QUEUE)

    assert sum(backlog.values()) == 0, backlog
    assert dead_letters == 0


@pytest.mark.sqlite_only
async def test_sdk_with_user_id_consumes_its_own_budget(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users
) -> None:
    await fund(rabbit, vhost, users, 100)
    url = rabbit.amqp_url(vhost, users.agent_a, PASSWORD)
    async with BudgetClient.connect(
        url, timeout=20, name=connection_name(), user_id=users.agent_a
    ) as client:
        view = await client.consume_and_wait(users.agent_a, 25)

    assert (view.allocated_tokens, view.used_tokens) == (100, 25)


@pytest.mark.sqlite_only
async def test_sdk_raises_unauthorized_error_for_another_agents_budget(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users
) -> None:
    await fund(rabbit, vhost, users, 100)
    url = rabbit.amqp_url(vhost, users.agent_a, PASSWORD)
    async with BudgetClient.connect(
        url, timeout=20, name=connection_name(), user_id=users.agent_a
    ) as client:
        with pytest.raises(UnauthorizedError) as raised:
            await client.consume_and_wait(users.agent_b, 25)

    assert raised.value.code == "unauthorized"


@pytest.mark.sqlite_only
async def test_workers_own_sweeper_still_expires_holds(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users, database_url: str
) -> None:
    # The sweeper publishes expire_reservations with the workers' broker user
    # (guest here, in no admin list) as user_id: internal commands from it pass.
    await fund(rabbit, vhost, users, 100)
    async with session(rabbit, vhost, users.agent_a) as agent_a:
        held = await agent_a.ask("reserve", users.agent_a, 40, fields={"ttl_seconds": 1})
    assert held.ok, held

    async with reader(database_url) as engine:

        async def statuses() -> list[str]:
            async with engine.connect() as conn:
                rows = await conn.execute(
                    select(reservations.c.status).where(reservations.c.agent_id == users.agent_a)
                )
                return [status for (status,) in rows]

        # Nothing more from the agent: only the sweeper can expire the hold.
        await eventually(
            statuses,
            within=30,
            what="the hold expired by the sweeper",
            done=lambda found: found == ["expired"],
        )


@pytest.mark.sqlite_only
async def test_budgetctl_acts_as_the_user_of_its_broker_url(
    auth_worker: AuthWorker, rabbit: RabbitAdmin, vhost: str, users: Users
) -> None:
    admin_url = rabbit.amqp_url(vhost, users.admin, PASSWORD)
    agent_url = rabbit.amqp_url(vhost, users.agent_a, PASSWORD)
    registered = await run_ctl("register", users.agent_a, "--amqp-url", admin_url)
    assert registered.code == 0, registered.err
    allocated = await run_ctl("allocate", users.agent_a, "50", "--amqp-url", admin_url)
    assert allocated.code == 0, allocated.err
    own = await run_ctl("consume", users.agent_a, "5", "--wait", "--amqp-url", agent_url)
    assert own.code == 0 and "used=5" in own.out, own.err
    refused = await run_ctl("allocate", users.agent_a, "50", "--amqp-url", agent_url)
    assert refused.code == 1 and "unauthorized" in refused.err
