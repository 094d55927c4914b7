"""A property that is not UTF-8 (any non-Python client can send one) is refused,
not fatal: the worker keeps its connection and the lane keeps going."""

import contextlib
import json
from collections.abc import Iterator

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from pamqp import encode

from tests.amqp_helpers import Amqp, Outgoing, command, open_amqp
from tests.eventually import eventually
from token_budget.schemas import DEAD_LETTER_QUEUE
from token_budget.worker.app import Worker
from token_budget.worker.broker.wire_guard import clean_text, has_invalid_text

BAD = b"\xff\xfeid".decode("utf-8", "surrogateescape")


@contextlib.contextmanager
def raw_short_strings() -> Iterator[None]:
    """Let this test's producer put arbitrary bytes on the wire, as a Go client can."""
    original = encode.METHODS["shortstr"]

    def short_string(value: str) -> bytes:
        raw = value.encode("utf-8", "surrogateescape")
        return encode.octet(len(raw)) + raw

    encode.METHODS["shortstr"] = short_string
    try:
        yield
    finally:
        encode.METHODS["shortstr"] = original


def test_clean_text_escapes_undecodable_bytes() -> None:
    assert has_invalid_text(BAD)
    assert clean_text(BAD) == "\\xff\\xfeid"
    assert not has_invalid_text(clean_text({"k": [BAD]}))


@pytest.mark.parametrize("prop", ["message_id", "correlation_id", "type"])
async def test_non_utf8_property_is_dead_lettered_and_the_lane_goes_on(
    worker: Worker, amqp_url: str, prop: str
) -> None:
    async with open_amqp(amqp_url) as amqp:
        reply_to, replies = await amqp.reply_queue()
        await amqp.publish(
            Outgoing(
                command("register_agent", "agent-x"),
                "agent-x",
                "reg-x",
                reply_to=reply_to,
                correlation_id="reg",
            )
        )
        await replies.reply("reg")
        bad = aio_pika.Message(
            command("allocate", "agent-x", 5), message_id="bad-1", content_type="application/json"
        )
        setattr(bad, prop, BAD)
        with raw_short_strings():
            await amqp.channel.default_exchange.publish(bad, routing_key="budget.lane.000")
            exchange = await amqp.channel.get_exchange("budget.commands", ensure=False)
            await exchange.publish(bad, routing_key="agent-x")
        await amqp.publish(
            Outgoing(
                command("allocate", "agent-x", 7),
                "agent-x",
                "alloc-x",
                reply_to=reply_to,
                correlation_id="alloc",
            )
        )
        reply = json.loads((await replies.reply("alloc")).body)
        assert reply["allocated_tokens"] == 7  # the bad allocate of 5 was not applied
        assert worker.connections == 1  # never lost its connection on the way
        dead = await _dead_letters(amqp, 2)
        for message in dead:
            assert message.headers["x-budget-error-code"] == "invalid_command"
            assert message.headers["x-budget-error"] in {
                f"property {prop} is not valid UTF-8",
                "routing key 'budget.lane.000' must equal agent_id 'agent-x'",
            }


async def _dead_letters(amqp: Amqp, count: int) -> list[AbstractIncomingMessage]:
    """Exactly ``count`` dead letters, taken out of the queue as they come."""
    taken: list[AbstractIncomingMessage] = []

    async def more() -> list[AbstractIncomingMessage]:
        taken.extend(await amqp.take_all(DEAD_LETTER_QUEUE))
        return taken

    await eventually(
        more, within=30, what=f"{count} dead letters", done=lambda found: len(found) >= count
    )
    assert len(taken) == count
    return taken
