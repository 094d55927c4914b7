"""Replies published to a command's ``reply_to``, and events on ``budget.events``."""

import json
from datetime import datetime
from typing import Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .commands import AgentId, CommandType, Consistency, Period
from .errors import ErrorCode

__all__ = [
    "PERIOD_FIELDS",
    "QUERY_FIELDS",
    "RESERVATION_FIELDS",
    "BudgetView",
    "ErrorBody",
    "ErrorReply",
    "OkReply",
    "RefusedEvent",
    "Reply",
    "ValidationIssue",
    "encode_reply",
    "parse_reply",
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _reserved_defaults_to_zero(data: Any) -> Any:
    # Replies recorded before reservations existed have no reserved_tokens,
    # and a duplicate replays them byte for byte: a budget then held nothing.
    if (
        isinstance(data, dict)
        and "reserved_tokens" not in data
        and data.get("allocated_tokens") is not None
    ):
        return {**data, "reserved_tokens": 0}
    return data


class BudgetView(_Wire):
    """An agent's budget. The token fields are null only in the reply to
    ``register_agent`` for an agent that has no budget yet.

    ``available_tokens = allocated_tokens - used_tokens - reserved_tokens``.
    """

    #: Whose budget: an agent's, or with ``group_id`` a group's (then absent).
    agent_id: AgentId | None = None
    group_id: AgentId | None = None
    allocated_tokens: int | None
    used_tokens: int | None
    #: Held by open reservations: neither used nor available.
    reserved_tokens: int | None = None
    available_tokens: int | None
    #: Set only for a query that named its ``consistency``: which state this
    #: is (``committed``: perhaps without commands still queued), as of when.
    consistency: Consistency | None = None
    as_of: datetime | None = None
    #: Set only for a budget with a period (``set_period``): usage goes back to
    #: 0 at ``resets_at``; both in the budget's time zone, with its offset.
    period: Period | None = None
    timezone: str | None = None
    period_start: datetime | None = None
    resets_at: datetime | None = None

    @model_validator(mode="before")
    @classmethod
    def _reserved_default(cls, data: Any) -> Any:
        return _reserved_defaults_to_zero(data)


#: Fields only the reply to ``reserve`` carries; absent from every other reply.
RESERVATION_FIELDS = frozenset({"reservation_id", "expires_at"})
#: Fields only the reply to a query that named its ``consistency`` carries.
QUERY_FIELDS = frozenset({"consistency", "as_of"})
#: Fields only the replies about a budget with a period carry.
PERIOD_FIELDS = frozenset({"period", "timezone", "period_start", "resets_at"})


class OkReply(_Wire):
    """Success: the budget after the command (see ``BudgetView``); the reply to
    ``reserve`` also names the reservation and when it expires."""

    ok: Literal[True] = True
    agent_id: AgentId | None = None
    #: Set instead of ``agent_id`` in the reply about a group's budget.
    group_id: AgentId | None = None
    allocated_tokens: int | None
    used_tokens: int | None
    reserved_tokens: int | None = None
    available_tokens: int | None
    reservation_id: str | None = None
    expires_at: datetime | None = None
    #: Which state the query's answer reflects, and as of when (UTC).
    consistency: Consistency | None = None
    as_of: datetime | None = None
    #: The budget's period, when it has one (see ``BudgetView``).
    period: Period | None = None
    timezone: str | None = None
    period_start: datetime | None = None
    resets_at: datetime | None = None

    @model_validator(mode="before")
    @classmethod
    def _reserved_default(cls, data: Any) -> Any:
        return _reserved_defaults_to_zero(data)

    def view(self) -> BudgetView:
        return BudgetView.model_validate(self.model_dump(exclude={"ok", *RESERVATION_FIELDS}))


class ValidationIssue(_Wire):
    """One field of an invalid command and what is wrong with it."""

    loc: str
    msg: str


class ErrorBody(_Wire):
    """Why a command was refused: a stable ``code`` and a message for people."""

    code: ErrorCode
    message: str
    #: insufficient_budget: what was asked for and what was left.
    requested_tokens: int | None = None
    available_tokens: int | None = None
    #: invalid_command: each problem found in the message.
    errors: list[ValidationIssue] | None = None
    #: insufficient_budget for an agent in a group: the id of the first level,
    #: from the agent upward, that lacked room (the agent's, or a group's).
    limited_by: str | None = None


class ErrorReply(_Wire):
    """The reply to a refused or invalid command."""

    ok: Literal[False] = False
    error: ErrorBody


Reply: TypeAlias = OkReply | ErrorReply


def encode_reply(reply: Reply) -> bytes:
    """The reply's body; absent error details, reservation, query and period
    fields are left out, not sent as null."""
    if isinstance(reply, ErrorReply):
        return reply.model_dump_json(exclude_none=True).encode()
    absent: set[str] = {"group_id"} if reply.group_id is None else {"agent_id"}
    if reply.reservation_id is None:
        absent |= RESERVATION_FIELDS
    if reply.consistency is None:
        absent |= QUERY_FIELDS
    if reply.period is None:
        absent |= PERIOD_FIELDS
    return reply.model_dump_json(exclude=absent).encode()


def parse_reply(body: bytes | str) -> Reply:
    """Parse a reply body (client side); raises ``pydantic.ValidationError``."""
    data = json.loads(body)
    if isinstance(data, dict) and data.get("ok") is False:
        return ErrorReply.model_validate(data)
    return OkReply.model_validate(data)


class RefusedEvent(_Wire):
    """Published with routing key ``budget.refused.<code>`` when a command sent
    without ``reply_to`` (fire-and-forget) is refused."""

    event: Literal["command_refused"] = "command_refused"
    agent_id: str
    command_type: CommandType
    message_id: str | None
    tokens: int | None = Field(default=None)
    error: ErrorBody
    occurred_at: datetime
