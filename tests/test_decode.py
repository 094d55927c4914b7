"""From a delivery's body and properties to a command, or the reason it is none
(worker/broker/decode.py): tables, no broker and no database.

tests/test_worker_dead_letters.py sends such deliveries through the real
worker; here each case is one call.
"""

import json
from typing import Any

import pytest

from token_budget.schemas import MAX_TOKENS, CommandType, ErrorCode
from token_budget.worker.broker.decode import Invalid, decode
from token_budget.worker.domain.outcomes import Envelope

LIMIT = 1024
AGENT = "agent-7"


def body(type_: str, agent: str = AGENT, **fields: Any) -> bytes:
    return json.dumps({"type": type_, "agent_id": agent, **fields}).encode()


def decoded(payload: bytes, **properties: Any) -> Envelope | Invalid:
    """``decode`` of a delivery with well-formed properties, but for ``properties``."""
    delivery: dict[str, Any] = {
        "routing_key": AGENT,
        "message_id": "m-1",
        "content_type": "application/json",
        "content_encoding": None,
        "max_body_bytes": LIMIT,
        **properties,
    }
    return decode(payload, **delivery)


CONSUME = body("consume", tokens=5)

#: One valid body per command type.
VALID = {
    CommandType.REGISTER_AGENT: body("register_agent"),
    CommandType.ALLOCATE: body("allocate", tokens=100),
    CommandType.CONSUME: CONSUME,
    CommandType.GET_BUDGET: body("get_budget"),
    CommandType.GET_AVAILABLE: body("get_available"),
    CommandType.RESERVE: body("reserve", tokens=5, ttl_seconds=60),
    CommandType.COMMIT: body("commit", reservation_id="r-1", tokens=3),
    CommandType.RELEASE: body("release", reservation_id="r-1"),
    CommandType.SET_THRESHOLDS: body("set_thresholds", thresholds=[50, 90]),
    CommandType.SET_PERIOD: body("set_period", period="week", timezone="America/New_York"),
    CommandType.SET_GROUP: body("set_group", group_id="team-a"),
    CommandType.REGISTER_GROUP: json.dumps(
        {"type": "register_group", "group_id": AGENT, "parent_id": "org-1"}
    ).encode(),
    CommandType.EXPIRE_RESERVATIONS: body("expire_reservations"),
}


def test_the_valid_table_has_every_command_type() -> None:
    assert set(VALID) == set(CommandType)


@pytest.mark.parametrize(("kind", "payload"), VALID.items(), ids=[k.value for k in VALID])
def test_a_valid_command_decodes_to_its_envelope(kind: CommandType, payload: bytes) -> None:
    result = decoded(payload)
    assert isinstance(result, Envelope), result
    assert (result.command.command_type, result.command.key) == (kind, AGENT)
    assert result.message_id == "m-1"


@pytest.mark.parametrize("kind", ["get_budget", "get_available", "expire_reservations"])
def test_a_command_that_changes_nothing_needs_no_message_id(kind: str) -> None:
    result = decoded(body(kind), message_id=None)
    assert isinstance(result, Envelope) and result.message_id is None


@pytest.mark.parametrize(
    "properties",
    [
        pytest.param({"content_type": None}, id="no_content_type"),
        pytest.param({"content_type": ""}, id="empty_content_type"),
        pytest.param({"content_type": "Application/JSON; charset=utf-8"}, id="json_with_charset"),
        pytest.param({"content_encoding": ""}, id="empty_encoding"),
        pytest.param({"content_encoding": "UTF-8"}, id="utf-8"),
        pytest.param({"content_encoding": "utf8"}, id="utf8"),
        pytest.param({"content_encoding": "identity"}, id="identity"),
    ],
)
def test_json_in_utf8_is_accepted_however_it_is_labelled(properties: dict[str, Any]) -> None:
    assert isinstance(decoded(CONSUME, **properties), Envelope)


def test_a_body_of_exactly_the_limit_is_accepted() -> None:
    padded = CONSUME[:-1] + b" " * (LIMIT - len(CONSUME)) + b"}"
    assert len(padded) == LIMIT
    assert isinstance(decoded(padded), Envelope)


#: (payload, properties, in the reason, locations of the issues).
INVALID = [
    pytest.param(
        CONSUME[:-1] + b" " * LIMIT + b"}",
        {},
        f"exceeds the limit of {LIMIT} bytes",
        (),
        id="too_big",
    ),
    pytest.param(
        CONSUME,
        {"content_type": "text/plain"},
        "content_type must be application/json, not 'text/plain'",
        (),
        id="wrong_content_type",
    ),
    pytest.param(
        CONSUME,
        {"content_encoding": "gzip"},
        "content_encoding 'gzip' is not supported",
        (),
        id="wrong_encoding",
    ),
    pytest.param(b"consume 5 tokens please", {}, "Invalid JSON", ("",), id="not_json"),
    pytest.param(CONSUME.decode().encode("utf-16"), {}, "Invalid JSON", ("",), id="not_utf8"),
    pytest.param(b"[" + CONSUME + b"]", {}, "Input should be an object", ("",), id="json_array"),
    pytest.param(body("refund", tokens=1), {}, "'refund'", ("",), id="unknown_type"),
    pytest.param(
        json.dumps({"agent_id": AGENT, "tokens": 1}).encode(),
        {},
        "discriminator 'type'",
        ("",),
        id="missing_type",
    ),
    pytest.param(
        body("consume"), {}, "consume.tokens: Field required", ("consume.tokens",), id="no_tokens"
    ),
    pytest.param(
        body("consume", tokens=1, model="x"),
        {},
        "consume.model: Extra inputs are not permitted",
        ("consume.model",),
        id="unknown_field",
    ),
    pytest.param(
        body("consume", tokens="1"),
        {},
        "consume.tokens: Input should be a valid integer",
        ("consume.tokens",),
        id="tokens_string",
    ),
    pytest.param(
        body("consume", tokens=1.0),
        {},
        "consume.tokens: Input should be a valid integer",
        ("consume.tokens",),
        id="tokens_float",
    ),
    pytest.param(
        body("consume", tokens=True),
        {},
        "consume.tokens: Input should be a valid integer",
        ("consume.tokens",),
        id="tokens_bool",
    ),
    pytest.param(
        body("consume", tokens=0),
        {},
        "greater than or equal to 1",
        ("consume.tokens",),
        id="tokens_zero",
    ),
    pytest.param(
        body("consume", tokens=MAX_TOKENS + 1),
        {},
        f"less than or equal to {MAX_TOKENS}",
        ("consume.tokens",),
        id="tokens_over_2_53",
    ),
    pytest.param(
        body("consume", agent="no spaces allowed", tokens=1),
        {"routing_key": "no spaces allowed"},
        "consume.agent_id: String should match pattern",
        ("consume.agent_id",),
        id="bad_agent_id",
    ),
    pytest.param(
        body("commit", reservation_id="r 1", tokens=1),
        {},
        "commit.reservation_id: String should match pattern",
        ("commit.reservation_id",),
        id="bad_reservation_id",
    ),
    pytest.param(
        body("set_thresholds", thresholds=[101]),
        {},
        "less than or equal to 100",
        ("set_thresholds.thresholds.0",),
        id="threshold_over_100",
    ),
    pytest.param(
        body("allocate", tokens=5, group_id="team-a"),
        {},
        "give exactly one of agent_id and group_id",
        ("allocate",),
        id="agent_and_group",
    ),
    pytest.param(
        json.dumps({"type": "get_budget"}).encode(),
        {},
        "give exactly one of agent_id and group_id",
        ("get_budget",),
        id="neither_agent_nor_group",
    ),
    pytest.param(
        body("consume", tokens=5, group_id="team-a"),
        {},
        "Extra inputs are not permitted",
        ("consume.group_id",),
        id="consume_for_a_group",
    ),
    pytest.param(
        json.dumps({"type": "register_group", "group_id": "bad id"}).encode(),
        {"routing_key": "bad id"},
        "String should match pattern",
        ("register_group.group_id",),
        id="bad_group_id",
    ),
    pytest.param(
        body("set_period", period="year"),
        {},
        "Input should be 'minute', 'hour', 'day', 'week' or 'month'",
        ("set_period.period",),
        id="unknown_period",
    ),
    pytest.param(
        body("set_period", period=1),
        {},
        "Input should be 'minute', 'hour', 'day', 'week' or 'month'",
        ("set_period.period",),
        id="period_a_number",
    ),
    pytest.param(
        body("set_period", period="day", timezone="Mars/Olympus"),
        {},
        "unknown time zone 'Mars/Olympus'",
        ("set_period.timezone",),
        id="unknown_time_zone",
    ),
    pytest.param(
        body("set_period", period="day", timezone="../../etc/passwd"),
        {},
        "String should match pattern",
        ("set_period.timezone",),
        id="time_zone_path",
    ),
    pytest.param(
        CONSUME,
        {"message_id": None},
        "a consume command must carry an AMQP message_id",
        (),
        id="no_message_id",
    ),
    pytest.param(
        CONSUME,
        {"message_id": "m\x00-1"},
        "message_id must not contain control characters",
        (),
        id="control_character_in_message_id",
    ),
    pytest.param(
        CONSUME,
        {"routing_key": "someone-else"},
        f"routing key 'someone-else' must equal agent_id '{AGENT}'",
        (),
        id="routing_key_not_agent",
    ),
    pytest.param(
        CONSUME,
        {"routing_key": None},
        f"routing key None must equal agent_id '{AGENT}'",
        (),
        id="no_routing_key",
    ),
]


@pytest.mark.parametrize(("payload", "properties", "reason", "locations"), INVALID)
def test_an_invalid_delivery_says_why_under_the_stable_code(
    payload: bytes, properties: dict[str, Any], reason: str, locations: tuple[str, ...]
) -> None:
    result = decoded(payload, **properties)
    assert isinstance(result, Invalid), result
    assert result.code is ErrorCode.INVALID_COMMAND
    assert reason in result.reason
    assert tuple(issue.loc for issue in result.issues) == locations


def test_the_reason_for_many_problems_is_cut_to_a_thousand_characters() -> None:
    unknown = {f"unknown_field_{n:03d}": n for n in range(200)}
    payload = json.dumps({"type": "consume", "agent_id": AGENT, "tokens": 1, **unknown}).encode()
    result = decoded(payload, max_body_bytes=64 * 1024)
    assert isinstance(result, Invalid)
    assert len(result.issues) == 200  # every one kept, for the reply's ``errors``
    assert len(result.reason) == 1000
