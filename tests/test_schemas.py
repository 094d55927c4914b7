"""The wire contract: strict command validation and reply encoding."""

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from token_budget.schemas import (
    AGENT_ID_MAX_LENGTH,
    AGENT_ID_PATTERN,
    MAX_TOKENS,
    PERIOD_FIELDS,
    Allocate,
    Consume,
    ErrorBody,
    ErrorCode,
    ErrorReply,
    GetAvailable,
    GetBudget,
    OkReply,
    Period,
    RegisterAgent,
    SetPeriod,
    ValidationIssue,
    encode_reply,
    is_valid_agent_id,
    parse_command,
    parse_reply,
)

AGENT_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@-"


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def consume(tokens: Any) -> bytes:
    return body(type="consume", agent_id="agent-1", tokens=tokens)


def refused(raw: bytes | str) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse_command(raw)
    return info.value


# --- the envelope of a command ----------------------------------------------


def test_each_command_type_parses_to_its_model() -> None:
    assert parse_command(body(type="register_agent", agent_id="a")) == RegisterAgent(
        type="register_agent", agent_id="a"
    )
    assert isinstance(parse_command(body(type="allocate", agent_id="a", tokens=3)), Allocate)
    assert isinstance(parse_command(body(type="consume", agent_id="a", tokens=3)), Consume)
    assert isinstance(parse_command(body(type="get_budget", agent_id="a")), GetBudget)
    assert isinstance(parse_command(body(type="get_available", agent_id="a")), GetAvailable)


def test_a_str_body_parses_like_bytes() -> None:
    raw = consume(7).decode()
    assert parse_command(raw) == parse_command(raw.encode())


def test_only_queries_do_not_change_state() -> None:
    changing = {m.__name__ for m in (RegisterAgent, Allocate, Consume) if m.changes_state}
    querying = {m.__name__ for m in (GetBudget, GetAvailable) if not m.changes_state}
    assert changing == {"RegisterAgent", "Allocate", "Consume"}
    assert querying == {"GetBudget", "GetAvailable"}


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"{", b'{"type": "consume",}', b"{'type': 'consume'}"],
    ids=["empty", "text", "truncated", "trailing-comma", "single-quotes"],
)
def test_a_body_that_is_not_json_is_refused(raw: bytes) -> None:
    assert refused(raw).errors()[0]["type"] == "json_invalid"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe{}",
        b'{"type": "register_agent", "agent_id": "a\xff"}',
        b'{"type": "register_agent", "agent_id": "a\xc3"}',
        '{"type": "register_agent", "agent_id": "é"}'.encode("latin-1"),
    ],
    ids=["bom-like", "invalid-byte", "truncated-sequence", "latin-1"],
)
def test_a_body_that_is_not_utf8_is_refused(raw: bytes) -> None:
    refused(raw)


@pytest.mark.parametrize("raw", [b"[]", b"[{}]", b'"consume"', b"42", b"null", b"true"])
def test_a_top_level_value_that_is_not_an_object_is_refused(raw: bytes) -> None:
    refused(raw)


@pytest.mark.parametrize("kind", ["refund", "CONSUME", "Consume", "", "consume ", "delete"])
def test_an_unknown_type_is_refused(kind: str) -> None:
    errors = refused(body(type=kind, agent_id="a", tokens=1)).errors()
    assert errors[0]["type"] == "union_tag_invalid"


@pytest.mark.parametrize("kind", [1, None, True, ["consume"], {"t": "consume"}])
def test_a_type_that_is_not_a_string_is_refused(kind: Any) -> None:
    refused(body(type=kind, agent_id="a", tokens=1))


def test_a_missing_type_is_refused() -> None:
    errors = refused(body(agent_id="a", tokens=1)).errors()
    assert errors[0]["type"] == "union_tag_not_found"


@pytest.mark.parametrize(
    "fields",
    [
        {"type": "consume", "agent_id": "a", "tokens": 1, "amount": 1},
        {"type": "register_agent", "agent_id": "a", "tokens": 1},
        {"type": "get_budget", "agent_id": "a", "message_id": "m-1"},
        {"type": "allocate", "agent_id": "a", "tokens": 1, "Tokens": 1},
    ],
    ids=["consume+amount", "register+tokens", "query+message_id", "allocate+case"],
)
def test_an_unknown_field_is_refused(fields: dict[str, Any]) -> None:
    errors = refused(json.dumps(fields)).errors()
    assert any(error["type"] == "extra_forbidden" for error in errors)


@pytest.mark.parametrize("kind", ["allocate", "consume"])
def test_missing_tokens_are_refused(kind: str) -> None:
    refused(body(type=kind, agent_id="a"))


def test_a_missing_agent_id_is_refused() -> None:
    refused(body(type="register_agent"))


# --- tokens -------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_tokens",
    [
        '"5"',
        "5.0",
        "1e3",
        "1E0",
        "5.5",
        "true",
        "false",
        "null",
        "0",
        "-1",
        "-0",
        str(-(2**53)),
        str(2**53 + 1),
        str(2**64),
        "1" + "0" * 400,
        "[5]",
        '{"n": 5}',
    ],
)
@pytest.mark.parametrize("kind", ["allocate", "consume"])
def test_tokens_outside_the_strict_integer_range_are_refused(kind: str, raw_tokens: str) -> None:
    # Written by hand so that 5.0, 1e3 and -0 reach the parser as spelled.
    errors = refused(f'{{"type": "{kind}", "agent_id": "a", "tokens": {raw_tokens}}}').errors()
    assert [error["loc"][-1] for error in errors] == ["tokens"]


@pytest.mark.parametrize("tokens", [1, 2**53])
@pytest.mark.parametrize("kind", ["allocate", "consume"])
def test_tokens_at_the_bounds_are_accepted(kind: str, tokens: int) -> None:
    command = parse_command(body(type=kind, agent_id="a", tokens=tokens))
    assert isinstance(command, Allocate | Consume)
    assert command.tokens == tokens
    assert type(command.tokens) is int


def test_max_tokens_is_the_largest_integer_every_json_parser_keeps_exactly() -> None:
    assert MAX_TOKENS == 2**53
    assert float(MAX_TOKENS) == MAX_TOKENS


@given(st.integers(min_value=1, max_value=MAX_TOKENS), st.sampled_from(["allocate", "consume"]))
def test_any_tokens_in_range_round_trip(tokens: int, kind: str) -> None:
    command = parse_command(body(type=kind, agent_id="a", tokens=tokens))
    assert isinstance(command, Allocate | Consume)
    assert command.tokens == tokens
    assert parse_command(command.model_dump_json()) == command


@given(
    st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_TOKENS + 1)),
    st.sampled_from(["allocate", "consume"]),
)
def test_any_tokens_out_of_range_are_refused(tokens: int, kind: str) -> None:
    refused(body(type=kind, agent_id="a", tokens=tokens))


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_any_json_float_is_refused_as_tokens(tokens: float) -> None:
    refused(body(type="consume", agent_id="a", tokens=tokens))


# --- agent ids ----------------------------------------------------------------


@pytest.mark.parametrize(
    "agent_id",
    [
        "a",
        "0",
        "A",
        "agent-1",
        "team.a:worker_7@host-2",
        "9-lives",
        "x" * AGENT_ID_MAX_LENGTH,
        "a" + AGENT_ID_ALPHABET,
    ],
)
def test_a_valid_agent_id_is_accepted(agent_id: str) -> None:
    assert parse_command(body(type="register_agent", agent_id=agent_id)).agent_id == agent_id
    assert is_valid_agent_id(agent_id)


def test_an_agent_id_of_128_characters_is_accepted_and_129_refused() -> None:
    assert AGENT_ID_MAX_LENGTH == 128
    parse_command(body(type="register_agent", agent_id="a" * 128))
    refused(body(type="register_agent", agent_id="a" * 129))


@pytest.mark.parametrize(
    "agent_id",
    [
        "",
        " ",
        "a b",
        " a",
        "a ",
        "a\n",
        "\na",
        "a\t",
        "a/b",
        "a#b",
        "a*b",
        "a+b",
        "a,b",
        "-a",
        ".a",
        "_a",
        ":a",
        "@a",
        "a\x00",
        "a\u200b",
        # Letters and digits outside ASCII: é, fullwidth a, Roman twelve, Arabic-Indic one.
        "é",
        "agent-é",
        "\uff41",
        "\u216b",
        "\u0661",
    ],
)
def test_an_agent_id_with_a_bad_character_or_start_is_refused(agent_id: str) -> None:
    errors = refused(body(type="register_agent", agent_id=agent_id)).errors()
    assert [error["loc"][-1] for error in errors] == ["agent_id"]
    assert not is_valid_agent_id(agent_id)


@pytest.mark.parametrize("agent_id", [5, 1.5, True, None, ["a"], {"id": "a"}])
def test_an_agent_id_that_is_not_a_string_is_refused(agent_id: Any) -> None:
    refused(body(type="register_agent", agent_id=agent_id))


def test_the_documented_character_set_is_the_pattern() -> None:
    assert AGENT_ID_PATTERN == r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
    for char in map(chr, range(0x250)):
        assert is_valid_agent_id("a" + char) is (char in AGENT_ID_ALPHABET), repr(char)


@given(st.text(max_size=140))
def test_any_text_agent_id_is_accepted_iff_it_matches_the_pattern(agent_id: str) -> None:
    expected = re.fullmatch(AGENT_ID_PATTERN, agent_id) is not None
    try:
        command = parse_command(body(type="register_agent", agent_id=agent_id))
    except ValidationError:
        accepted = False
    else:
        accepted = command.agent_id == agent_id
    assert accepted is expected
    assert is_valid_agent_id(agent_id) is expected


@given(st.text(alphabet=AGENT_ID_ALPHABET, min_size=1, max_size=140))
def test_any_agent_id_over_the_alphabet_is_accepted_iff_well_formed(agent_id: str) -> None:
    # Random text rarely hits the alphabet; this draws from it to reach both sides of
    # the length bound and the first-character rule.
    expected = len(agent_id) <= AGENT_ID_MAX_LENGTH and agent_id[0].isalnum()
    try:
        parse_command(body(type="register_agent", agent_id=agent_id))
    except ValidationError:
        accepted = False
    else:
        accepted = True
    assert accepted is expected


# --- replies ------------------------------------------------------------------

token_counts = st.none() | st.integers(min_value=0, max_value=2**63 - 1)
agent_ids = st.from_regex(AGENT_ID_PATTERN, fullmatch=True)


@given(agent_ids, token_counts, token_counts, token_counts)
def test_an_ok_reply_round_trips(
    agent_id: str, allocated: int | None, used: int | None, available: int | None
) -> None:
    reply = OkReply(
        agent_id=agent_id,
        allocated_tokens=allocated,
        used_tokens=used,
        available_tokens=available,
    )
    assert parse_reply(encode_reply(reply)) == reply


def test_an_ok_reply_without_budget_sends_nulls() -> None:
    reply = OkReply(agent_id="a", allocated_tokens=None, used_tokens=None, available_tokens=None)
    assert json.loads(encode_reply(reply)) == {
        "ok": True,
        "agent_id": "a",
        "allocated_tokens": None,
        "used_tokens": None,
        "reserved_tokens": None,
        "available_tokens": None,
    }


issues = st.lists(st.builds(ValidationIssue, loc=st.text(), msg=st.text()), max_size=3)


@given(
    st.sampled_from(ErrorCode),
    st.text(),
    st.none() | st.integers(min_value=1, max_value=MAX_TOKENS),
    token_counts,
    st.none() | issues,
)
def test_an_error_reply_round_trips(
    code: ErrorCode,
    message: str,
    requested: int | None,
    available: int | None,
    errors: list[ValidationIssue] | None,
) -> None:
    reply = ErrorReply(
        error=ErrorBody(
            code=code,
            message=message,
            requested_tokens=requested,
            available_tokens=available,
            errors=errors,
        )
    )
    assert parse_reply(encode_reply(reply)) == reply


def test_an_error_reply_leaves_out_absent_details() -> None:
    reply = ErrorReply(error=ErrorBody(code=ErrorCode.AGENT_NOT_FOUND, message="no such agent"))
    assert json.loads(encode_reply(reply)) == {
        "ok": False,
        "error": {"code": "agent_not_found", "message": "no such agent"},
    }


def test_an_error_reply_keeps_the_details_it_has() -> None:
    reply = ErrorReply(
        error=ErrorBody(
            code=ErrorCode.INSUFFICIENT_BUDGET,
            message="short",
            requested_tokens=10,
            available_tokens=0,
        )
    )
    assert json.loads(encode_reply(reply))["error"] == {
        "code": "insufficient_budget",
        "message": "short",
        "requested_tokens": 10,
        "available_tokens": 0,
    }


def test_a_reply_with_an_unknown_error_code_is_refused() -> None:
    with pytest.raises(ValidationError):
        parse_reply(b'{"ok": false, "error": {"code": "no_such_code", "message": "x"}}')


def test_set_period_without_a_time_zone_is_the_same_command_as_utc() -> None:
    bare = parse_command('{"type": "set_period", "agent_id": "a", "period": "day"}')
    utc = parse_command(
        '{"type": "set_period", "agent_id": "a", "period": "day", "timezone": "UTC"}'
    )
    assert bare == utc and bare.model_dump_json() == utc.model_dump_json()


def test_set_period_must_name_its_period_even_to_remove_it() -> None:
    with pytest.raises(ValidationError, match="period"):
        parse_command('{"type": "set_period", "agent_id": "a"}')
    removed = parse_command('{"type": "set_period", "agent_id": "a", "period": null}')
    assert isinstance(removed, SetPeriod) and removed.period is None


def test_a_reply_without_a_period_leaves_the_period_fields_out() -> None:
    plain = OkReply(
        agent_id="a", allocated_tokens=10, used_tokens=1, reserved_tokens=0, available_tokens=9
    )
    assert not set(json.loads(encode_reply(plain))) & PERIOD_FIELDS
    daily = plain.model_copy(update={"period": Period.DAY, "timezone": "UTC"})
    assert set(json.loads(encode_reply(daily))) >= PERIOD_FIELDS
