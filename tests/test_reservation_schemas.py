"""The new commands and reply fields on the wire: strict, and compatible with old replies."""

import json
from typing import Any

import pytest
from pydantic import ValidationError

from token_budget.schemas import (
    Commit,
    ExpireReservations,
    OkReply,
    Reserve,
    SetThresholds,
    encode_reply,
    parse_command,
    parse_reply,
)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "reserve", "agent_id": "a", "tokens": 0},
        {"type": "reserve", "agent_id": "a", "tokens": 5, "ttl_seconds": 0},
        {"type": "reserve", "agent_id": "a", "tokens": 5, "ttl_seconds": 86401},
        {"type": "reserve", "agent_id": "a", "tokens": 5, "ttl_seconds": "60"},
        {"type": "reserve", "agent_id": "a", "tokens": 5, "ttl_seconds": 60.0},
        {"type": "commit", "agent_id": "a", "reservation_id": "r", "tokens": -1},
        {"type": "commit", "agent_id": "a", "reservation_id": "r", "tokens": 2**53 + 1},
        {"type": "commit", "agent_id": "a", "reservation_id": "r"},
        {"type": "commit", "agent_id": "a", "reservation_id": "has space", "tokens": 1},
        {"type": "commit", "agent_id": "a", "reservation_id": "x" * 65, "tokens": 1},
        {"type": "release", "agent_id": "a", "reservation_id": 7},
        {"type": "release", "agent_id": "a"},
        {"type": "set_thresholds", "agent_id": "a", "thresholds": [0]},
        {"type": "set_thresholds", "agent_id": "a", "thresholds": [101]},
        {"type": "set_thresholds", "agent_id": "a", "thresholds": ["50"]},
        {"type": "set_thresholds", "agent_id": "a", "thresholds": 50},
        {"type": "expire_reservations", "agent_id": "a", "tokens": 1},
    ],
    ids=lambda fields: "-".join(f"{k}={v}" for k, v in fields.items() if k != "agent_id")[:60],
)
def test_a_malformed_reservation_command_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        parse_command(body(**fields))


def test_a_commit_of_zero_tokens_is_valid() -> None:
    command = parse_command(body(type="commit", agent_id="a", reservation_id="r-1", tokens=0))
    assert isinstance(command, Commit) and command.tokens == 0


def test_a_reserve_without_ttl_leaves_it_to_the_worker() -> None:
    command = parse_command(body(type="reserve", agent_id="a", tokens=5))
    assert isinstance(command, Reserve) and command.ttl_seconds is None


def test_thresholds_are_one_setting_whatever_their_order_and_repeats() -> None:
    command = parse_command(body(type="set_thresholds", agent_id="a", thresholds=[90, 50, 90]))
    assert isinstance(command, SetThresholds) and command.thresholds == (50, 90)


def test_expire_reservations_is_internal_and_needs_no_message_id() -> None:
    command = parse_command(body(type="expire_reservations", agent_id="a"))
    assert isinstance(command, ExpireReservations)
    assert command.internal and not command.changes_state


def test_only_the_reserve_reply_carries_the_reservation_fields() -> None:
    plain = OkReply(
        agent_id="a", allocated_tokens=10, used_tokens=1, reserved_tokens=2, available_tokens=7
    )
    assert set(json.loads(encode_reply(plain))) == {
        "ok",
        "agent_id",
        "allocated_tokens",
        "used_tokens",
        "reserved_tokens",
        "available_tokens",
    }
    held = plain.model_copy(update={"reservation_id": "r-1"})
    assert json.loads(encode_reply(held))["reservation_id"] == "r-1"
    assert parse_reply(encode_reply(held)) == held


def test_a_reply_recorded_before_reservations_existed_reads_as_nothing_reserved() -> None:
    old = b'{"ok":true,"agent_id":"a","allocated_tokens":10,"used_tokens":4,"available_tokens":6}'
    reply = parse_reply(old)
    assert isinstance(reply, OkReply) and reply.reserved_tokens == 0
    assert reply.view().reserved_tokens == 0
