"""Hypothesis throws malformed, oversized, wrongly typed and boundary-valued
messages and properties at the running worker, between good commands.

Each hostile message aims at an agent that does not exist, so even one that
happens to be valid cannot move a balance: whatever it is, the good traffic
around it must be applied exactly, the broken ones dead-lettered, and the
lanes must drain (nothing stalls, nothing loops).
"""

import json
import string
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.amqp_helpers import NO_MESSAGE_ID, Amqp, Outgoing, command, open_amqp, setup_agent
from tests.db_helpers import balances, reader
from tests.eventually import eventually
from tests.support import unique
from token_budget.schemas import DEAD_LETTER_QUEUE, HEADER_ERROR, HEADER_ERROR_CODE, MAX_TOKENS
from token_budget.worker.app import Worker
from token_budget.worker.settings import Settings

MAX_BODY = 2048
GOOD_TYPES = ["consume", "allocate", "register_agent", "get_budget"]


@dataclass(frozen=True)
class Hostile:
    body: bytes
    routing_key: str
    message_id: str | None
    content_type: str | None
    content_encoding: str | None
    #: Broken by construction: the worker must dead-letter it.
    broken: bool


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
bad_tokens = st.one_of(
    st.integers(max_value=0),
    st.integers(min_value=MAX_TOKENS + 1, max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)
good_tokens = st.integers(min_value=1, max_value=MAX_TOKENS)
ghost_ids = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=12).map(
    lambda s: f"ghost-{s}"
)


@st.composite
def hostile(draw: st.DrawFn) -> Hostile:
    agent = draw(ghost_ids)
    kind = draw(st.sampled_from(["bytes", "json", "near", "oversized", "properties"]))
    content_type: str | None = "application/json"
    encoding: str | None = None
    message_id: str | None = draw(st.text(alphabet=string.printable[:94], min_size=1, max_size=40))
    if kind == "bytes":
        body = draw(st.binary(max_size=200))
        broken = False  # almost surely broken, but not by construction
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
        broken = False
    elif kind == "near":
        fields: dict[str, object] = {
            "type": draw(st.sampled_from([*GOOD_TYPES, "refund", "", "CONSUME"])),
            "agent_id": agent,
        }
        field = draw(st.sampled_from(["tokens", "extra", "agent", "type"]))
        if field == "tokens":
            fields["tokens"] = draw(bad_tokens)
        elif field == "extra":
            fields["tokens"] = draw(good_tokens)
            fields[draw(st.sampled_from(["model", "Tokens", "token", "amount"]))] = 1
        elif field == "agent":
            fields["agent_id"] = draw(
                st.one_of(
                    st.text(max_size=3).map(lambda s: s + " x"),
                    st.text(min_size=129, max_size=140),
                    st.integers(),
                    st.none(),
                )
            )
            fields["tokens"] = 1
        else:
            fields["type"] = draw(
                st.one_of(
                    st.integers(),
                    st.none(),
                    st.text(max_size=5).filter(lambda t: t not in GOOD_TYPES),
                )
            )
        body = json.dumps(fields).encode()
        broken = True
    elif kind == "oversized":
        body = command("consume", agent, 1)[:-1] + b" " * draw(st.integers(MAX_BODY, 3 * MAX_BODY))
        body += b"}"
        broken = True
    else:  # a valid body with broken properties
        body = command("consume", agent, draw(good_tokens))
        choice = draw(st.sampled_from(["content_type", "encoding", "message_id", "routing"]))
        broken = True
        if choice == "content_type":
            content_type = draw(st.sampled_from(["text/plain", "application/xml", "json"]))
        elif choice == "encoding":
            encoding = draw(st.sampled_from(["gzip", "deflate", "latin-1"]))
        elif choice == "message_id":
            message_id = None
        else:
            return Hostile(body, f"{agent}-elsewhere", message_id, content_type, None, True)
    return Hostile(body, agent, message_id, content_type, encoding, broken)


@pytest.fixture
def worker_settings(worker_settings: Settings) -> Settings:
    """The shared settings with a small body limit, so oversized bodies stay cheap."""
    return worker_settings.model_copy(update={"max_body_bytes": MAX_BODY})


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(messages=st.lists(hostile(), min_size=15, max_size=40))
async def test_hostile_messages_never_disturb_good_traffic(
    worker: Worker, amqp_url: str, database_url: str, messages: list[Hostile]
) -> None:
    agent = unique("steady")
    async with open_amqp(amqp_url) as amqp:
        await setup_agent(amqp, agent, 10**12)
        reply_to, replies = await amqp.reply_queue()
        expected_used = 0
        tags = []
        for n, message in enumerate(messages):
            tokens = n + 1
            expected_used += tokens
            await amqp.publish(
                Outgoing(
                    command("consume", agent, tokens),
                    agent,
                    message_id=unique("good"),
                    reply_to=reply_to,
                    correlation_id=f"good-{n}",
                )
            )
            tag = unique("hostile")
            tags.append(tag)
            await _publish_hostile(amqp, message, tag)
        # A last command after everything: once it is answered, all before it
        # on the lane were handled (the lane is ordered).
        await amqp.publish(
            Outgoing(command("get_budget", agent), agent, reply_to=reply_to, correlation_id="last")
        )
        last = json.loads((await replies.reply("last", within=60)).body)
        assert last["used_tokens"] == expected_used
        assert worker.connections == 1  # no message dropped the connection
        dead = {m.correlation_id: m for m in await amqp.take_all(DEAD_LETTER_QUEUE)}
        # Nothing stalls and nothing loops: every lane drains.
        await eventually(
            lambda: amqp.lane_backlog(worker.topology.partitions),
            within=30,
            what="every lane drained",
            done=lambda backlog: not any(backlog.values()),
        )
    for message, tag in zip(messages, tags, strict=True):
        letter = dead.get(tag)
        if letter is None:
            # Only a random body that happens to be a valid command for a ghost
            # agent may pass; it is refused (agent_not_found), never applied.
            assert not message.broken and _parses(message), message
            continue
        assert letter.headers[HEADER_ERROR_CODE] == "invalid_command"
        assert letter.headers[HEADER_ERROR]
        assert letter.body == message.body
    async with reader(database_url) as engine:
        books = await balances(engine)
    assert books[agent] == (10**12, expected_used)
    assert not any(name.startswith("ghost-") for name in books)


def _parses(message: Hostile) -> bool:
    try:
        data = json.loads(message.body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("agent_id") == message.routing_key


async def _publish_hostile(amqp: Amqp, message: Hostile, tag: str) -> None:
    await amqp.publish(
        Outgoing(
            message.body,
            message.routing_key,
            message_id=message.message_id if message.message_id is not None else NO_MESSAGE_ID,
            correlation_id=tag,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
        )
    )
