"""The authorization rule table (worker/broker/auth.py) and its settings.

How an unauthorized command is settled is in tests/test_settle.py."""

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from token_budget.schemas import Command, CommandType, ErrorCode, ErrorReply, parse_command
from token_budget.worker.broker.auth import AuthPolicy, authorize, unauthorized_outcome
from token_budget.worker.domain.outcomes import OutcomeKind
from token_budget.worker.settings import AuthMode, Settings

ADMIN = "ops"
WORKER = "budget-worker"
POLICY = AuthPolicy(AuthMode.USER_ID, frozenset({ADMIN, "billing"}), WORKER)
AGENTS = ["agent-a", "agent-b", "ops-agent"]

#: The rule table of docs/protocol.md, written out independently of worker/broker/auth.py.
WHO_MAY = {
    CommandType.REGISTER_AGENT: "admin",
    CommandType.ALLOCATE: "admin",
    CommandType.CONSUME: "own",
    CommandType.GET_BUDGET: "own",
    CommandType.GET_AVAILABLE: "own",
    CommandType.RESERVE: "own",
    CommandType.COMMIT: "own",
    CommandType.RELEASE: "own",
    CommandType.SET_THRESHOLDS: "admin",
    CommandType.SET_PERIOD: "admin",
    CommandType.REGISTER_GROUP: "admin",
    CommandType.SET_GROUP: "admin",
    CommandType.EXPIRE_RESERVATIONS: "internal",
}
OWN = [kind for kind, who in WHO_MAY.items() if who == "own"]
ADMIN_ONLY = [kind for kind, who in WHO_MAY.items() if who != "own"]
INTERNAL = [kind for kind, who in WHO_MAY.items() if who == "internal"]

#: The fields each type needs besides ``type`` and ``agent_id``.
FIELDS: dict[CommandType, dict[str, Any]] = {
    CommandType.ALLOCATE: {"tokens": 5},
    CommandType.CONSUME: {"tokens": 5},
    CommandType.RESERVE: {"tokens": 5},
    CommandType.COMMIT: {"reservation_id": "r-1", "tokens": 5},
    CommandType.RELEASE: {"reservation_id": "r-1"},
    CommandType.SET_THRESHOLDS: {"thresholds": [50, 90]},
    CommandType.SET_PERIOD: {"period": "day", "timezone": "Europe/Berlin"},
    CommandType.SET_GROUP: {"group_id": "team-a"},
}


def make(kind: CommandType, agent: str, tokens: int = 5) -> Command:
    body: dict[str, Any] = {"type": kind.value, "agent_id": agent, **FIELDS.get(kind, {})}
    if kind is CommandType.REGISTER_GROUP:
        body = {"type": kind.value, "group_id": agent}
    if "tokens" in body:
        body["tokens"] = tokens
    return parse_command(json.dumps(body))


def allowed_by_model(kind: CommandType, agent: str, sender: str | None, policy: AuthPolicy) -> bool:
    if policy.mode is AuthMode.NONE:
        return True
    if not sender:
        return False
    if sender in policy.admin_users:
        return True
    if WHO_MAY[kind] == "internal":
        return sender == policy.worker_user
    return WHO_MAY[kind] == "own" and sender == agent


def test_the_model_covers_every_command_type() -> None:
    assert set(WHO_MAY) == set(CommandType)


@pytest.mark.parametrize("kind", list(CommandType))
@pytest.mark.parametrize("sender", [None, "", "agent-a", "agent-b", ADMIN])
def test_mode_none_allows_every_command_from_anyone(kind: CommandType, sender: str | None) -> None:
    assert authorize(make(kind, "agent-a"), sender, AuthPolicy()) is None


@pytest.mark.parametrize("kind", list(CommandType))
@pytest.mark.parametrize("sender", [None, ""])
def test_command_without_user_id_is_unauthorized(kind: CommandType, sender: str | None) -> None:
    error = authorize(make(kind, "agent-a"), sender, POLICY)
    assert error is not None and error.code is ErrorCode.UNAUTHORIZED
    assert "no user_id" in error.message


@pytest.mark.parametrize("kind", list(CommandType))
@pytest.mark.parametrize("admin", sorted(POLICY.admin_users))
def test_admin_may_send_every_command_for_any_agent(kind: CommandType, admin: str) -> None:
    for agent in AGENTS:
        assert authorize(make(kind, agent), admin, POLICY) is None


@pytest.mark.parametrize("kind", OWN)
def test_agents_own_user_may_spend_and_query_its_own_budget(kind: CommandType) -> None:
    assert authorize(make(kind, "agent-a"), "agent-a", POLICY) is None


@pytest.mark.parametrize("kind", OWN)
def test_agents_user_may_not_spend_or_query_another_agents_budget(kind: CommandType) -> None:
    error = authorize(make(kind, "agent-b"), "agent-a", POLICY)
    assert error is not None and error.code is ErrorCode.UNAUTHORIZED
    assert "'agent-a'" in error.message and "'agent-b'" in error.message


@pytest.mark.parametrize("kind", ADMIN_ONLY)
def test_admin_only_commands_are_refused_to_the_agents_own_user(kind: CommandType) -> None:
    error = authorize(make(kind, "agent-a"), "agent-a", POLICY)
    assert error is not None and error.code is ErrorCode.UNAUTHORIZED
    assert "admin users may" in error.message


@pytest.mark.parametrize("kind", INTERNAL)
def test_workers_own_user_may_send_internal_commands(kind: CommandType) -> None:
    for agent in AGENTS:
        assert authorize(make(kind, agent), WORKER, POLICY) is None


@pytest.mark.parametrize("kind", [k for k in CommandType if k not in INTERNAL])
def test_workers_own_user_is_no_admin(kind: CommandType) -> None:
    assert authorize(make(kind, "agent-a"), WORKER, POLICY) is not None


def test_admin_names_match_exactly() -> None:
    for near_miss in ("OPS", "ops ", " ops", "op", "opss"):
        assert authorize(make(CommandType.ALLOCATE, "agent-a"), near_miss, POLICY) is not None


def test_user_id_mode_without_admins_lets_nobody_register() -> None:
    policy = AuthPolicy(AuthMode.USER_ID)
    assert authorize(make(CommandType.REGISTER_AGENT, "agent-a"), "agent-a", policy) is not None
    assert authorize(make(CommandType.CONSUME, "agent-a"), "agent-a", policy) is None


@pytest.mark.parametrize("kind", [CommandType.CONSUME, CommandType.ALLOCATE])
def test_a_sender_that_is_not_utf8_is_refused_with_an_encodable_reply(kind: CommandType) -> None:
    # The worker decodes such bytes with surrogateescape (worker/broker/wire_guard.py);
    # quoted raw into the message, they would make the reply unencodable.
    sender = b"\xffagent-a".decode("utf-8", "surrogateescape")
    error = authorize(make(kind, "agent-a"), sender, POLICY)
    assert error is not None
    body = json.loads(unauthorized_outcome(error).body)
    assert "\\udcffagent-a" in body["error"]["message"]


senders = st.one_of(
    st.none(),
    st.sampled_from(["", ADMIN, "billing", WORKER, *AGENTS]),
    st.text(max_size=20),
)
policies = st.builds(
    AuthPolicy,
    st.sampled_from(list(AuthMode)),
    st.frozensets(st.sampled_from([ADMIN, "billing", WORKER, *AGENTS]), max_size=3),
    st.sampled_from([None, WORKER, *AGENTS]),
)


@given(
    kind=st.sampled_from(list(CommandType)),
    agent=st.sampled_from(AGENTS),
    sender=senders,
    policy=policies,
    tokens=st.integers(1, 2**53),
)
def test_authorize_agrees_with_the_rule_table(
    kind: CommandType, agent: str, sender: str | None, policy: AuthPolicy, tokens: int
) -> None:
    error = authorize(make(kind, agent, tokens), sender, policy)
    assert (error is None) == allowed_by_model(kind, agent, sender, policy)
    if error is not None:
        assert error.code is ErrorCode.UNAUTHORIZED


def test_unauthorized_outcome_is_an_error_reply_with_the_code() -> None:
    error = authorize(make(CommandType.CONSUME, "agent-b"), "agent-a", POLICY)
    assert error is not None
    outcome = unauthorized_outcome(error)
    assert outcome.kind is OutcomeKind.UNAUTHORIZED
    assert isinstance(outcome.reply, ErrorReply) and not outcome.ok
    body = json.loads(outcome.body)
    assert body["ok"] is False and body["error"]["code"] == "unauthorized"
    assert set(body["error"]) == {"code", "message"}


def test_settings_default_to_no_authorization(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BUDGET_AUTH", raising=False)
    monkeypatch.delenv("BUDGET_ADMIN_USERS", raising=False)
    settings = Settings()
    assert (settings.auth, settings.admin_users) == (AuthMode.NONE, [])
    assert not AuthPolicy.from_settings(settings).enforced


def test_settings_read_mode_and_comma_separated_admins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGET_AUTH", "user-id")
    monkeypatch.setenv("BUDGET_ADMIN_USERS", " ops, billing,,")
    settings = Settings()
    assert settings.admin_users == ["ops", "billing"]
    assert AuthPolicy.from_settings(settings).admin_users == frozenset({"ops", "billing"})


@pytest.mark.parametrize(
    ("url", "user"),
    [
        ("amqp://budget%2Dworker:secret@rabbit:5672/prod", "budget-worker"),
        ("amqp://w@rabbit/", "w"),
        ("amqp://rabbit/", "guest"),
    ],
)
def test_policy_knows_the_workers_broker_user_from_the_url(url: str, user: str) -> None:
    settings = Settings(amqp_url=SecretStr(url), auth=AuthMode.USER_ID)
    assert AuthPolicy.from_settings(settings).worker_user == user


def test_settings_refuse_an_unknown_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGET_AUTH", "user_id")
    with pytest.raises(ValueError, match="user-id"):
        Settings()
