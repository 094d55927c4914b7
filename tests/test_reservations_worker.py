"""Holds and threshold events through the real worker, broker and both databases."""

import json
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from tests.amqp_helpers import Amqp, Outgoing, command, open_amqp
from tests.db_helpers import reader
from tests.eventually import eventually
from tests.inprocess import running
from token_budget.schemas import (
    HEADER_DUPLICATE,
    OkReply,
    ThresholdCrossedEvent,
    parse_reply,
)
from token_budget.worker.app import Worker
from token_budget.worker.settings import Settings
from token_budget.worker.store.audit import history, reconcile
from token_budget.worker.store.tables import outbox, reservations


@pytest.fixture
async def fast_worker(worker_settings: Settings) -> AsyncIterator[Worker]:
    """A worker that sweeps overdue holds every 0.2 s, and holds for 7 s by default."""
    settings = worker_settings.model_copy(
        update={"reservation_sweep_interval": 0.2, "reservation_ttl": 7}
    )
    started = Worker(settings)
    async with running(started):
        yield started


async def ask(amqp: Amqp, body: bytes, agent: str, message_id: str | None) -> OkReply:
    reply_to, replies = await amqp.reply_queue()
    await amqp.publish(
        Outgoing(body, agent, message_id=message_id, reply_to=reply_to, correlation_id="ask")
    )
    reply = parse_reply((await replies.reply("ask")).body)
    assert isinstance(reply, OkReply), reply
    return reply


async def funded(amqp: Amqp, agent: str, tokens: int) -> None:
    await ask(amqp, command("register_agent", agent), agent, f"{agent}:register")
    await ask(amqp, command("allocate", agent, tokens), agent, f"{agent}:allocate")


def reserve_body(agent: str, tokens: int, ttl: int) -> bytes:
    return json.dumps(
        {"type": "reserve", "agent_id": agent, "tokens": tokens, "ttl_seconds": ttl}
    ).encode()


async def test_a_reserve_published_twice_is_held_once_under_one_reservation_id(
    worker: Worker, amqp_url: str, database_url: str
) -> None:
    async with open_amqp(amqp_url) as amqp:
        await funded(amqp, "twice", 100)
        reply_to, replies = await amqp.reply_queue()
        for attempt in ("first", "second"):
            await amqp.publish(
                Outgoing(
                    reserve_body("twice", 40, 300),
                    "twice",
                    message_id="twice:hold",
                    reply_to=reply_to,
                    correlation_id=attempt,
                )
            )
        first, second = await replies.reply("first"), await replies.reply("second")
    assert second.body == first.body
    assert (second.headers or {}).get(HEADER_DUPLICATE) is True
    reply = parse_reply(first.body)
    assert isinstance(reply, OkReply) and reply.reservation_id is not None
    assert (reply.reserved_tokens, reply.available_tokens) == (40, 60)
    async with reader(database_url) as engine:
        assert [e.kind for e in await history(engine, "twice")] == ["allocate", "reserve"]


async def test_a_reserve_without_ttl_holds_for_the_workers_configured_ttl(
    fast_worker: Worker, amqp_url: str, database_url: str
) -> None:
    async with open_amqp(amqp_url) as amqp:
        await funded(amqp, "default-ttl", 100)
        body = json.dumps({"type": "reserve", "agent_id": "default-ttl", "tokens": 5}).encode()
        held = await ask(amqp, body, "default-ttl", "default-ttl:hold")
    async with reader(database_url) as engine, engine.connect() as conn:
        row = (
            await conn.execute(
                select(reservations.c.created_at, reservations.c.expires_at).where(
                    reservations.c.reservation_id == held.reservation_id
                )
            )
        ).one()
    assert (row.expires_at - row.created_at).total_seconds() == 7
    assert held.expires_at is not None


async def test_an_abandoned_hold_is_expired_by_the_sweeper_in_the_agents_lane(
    fast_worker: Worker, amqp_url: str, database_url: str
) -> None:
    async with open_amqp(amqp_url) as amqp:
        await funded(amqp, "idle", 100)
        held = await ask(amqp, reserve_body("idle", 100, 1), "idle", "idle:hold")
        async with reader(database_url) as engine:
            entries = await eventually(
                lambda: history(engine, "idle"),
                within=60,
                what="the hold expired",
                done=lambda found: len(found) == 3,
            )
            assert [(e.kind, e.message_id) for e in entries] == [
                ("allocate", "idle:allocate"),
                ("reserve", "idle:hold"),
                ("expire", f"expire:{held.reservation_id}"),
            ]
            # Nothing but the sweeper's command touched the agent: it came
            # through the lane, which applied it after the agent's own commands.
            spent = await ask(amqp, command("consume", "idle", 100), "idle", "idle:spend")
            assert (spent.used_tokens, spent.reserved_tokens) == (100, 0)
            assert await reconcile(engine) == []


async def test_a_threshold_crossing_is_published_once_with_its_event_id(
    worker: Worker, amqp_url: str, database_url: str
) -> None:
    async with open_amqp(amqp_url) as amqp:
        events = await amqp.bind_events("budget.threshold.#")
        await funded(amqp, "spender", 100)
        crossing = Outgoing(command("consume", "spender", 60), "spender", message_id="sp:1")
        await amqp.publish(crossing)
        await amqp.publish(crossing)  # a retry: deduplicated, no second event
        await ask(amqp, command("consume", "spender", 20), "spender", "sp:2")  # crosses 80
        found = await eventually(
            lambda: list(events.messages),
            within=30,
            what="the crossing of 80",
            done=lambda ms: any(m.routing_key == "budget.threshold.80" for m in ms),
        )
    assert [m.routing_key for m in found] == ["budget.threshold.50", "budget.threshold.80"]
    first = ThresholdCrossedEvent.model_validate_json(found[0].body)
    assert found[0].message_id == first.event_id
    assert found[0].type == "threshold_crossed"
    assert (first.agent_id, first.threshold, first.allocated_tokens, first.used_tokens) == (
        "spender",
        50,
        100,
        60,
    )
    assert first.message_id == "sp:1"
    async with reader(database_url) as engine:

        async def marks() -> list[object]:
            async with engine.connect() as conn:
                return list((await conn.execute(select(outbox.c.published_at))).scalars())

        # Marked published right after the broker's confirm.
        final = await eventually(
            marks, within=30, what="both events marked", done=lambda found: None not in found
        )
        assert len(final) == 2
