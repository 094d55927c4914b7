"""Every failure the SDK raises, under one root with a stable ``code``.

Refusals mirror the worker's wire codes one to one; the others say what the
client could not find out (``timeout``) or could not do (``not_delivered``),
and what is safe to do next.
"""

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from token_budget.schemas import ErrorBody, ErrorCode, ValidationIssue

__all__ = [
    "AgentNotFoundError",
    "BalanceOverflowError",
    "BrokerUnavailable",
    "BudgetClientError",
    "BudgetNotFoundError",
    "CommandRefused",
    "ConflictError",
    "DatabaseRejectedError",
    "GroupNotFoundError",
    "HoldsOpenError",
    "InsufficientBudgetError",
    "InvalidCommandError",
    "InvalidReply",
    "NoWorker",
    "NotDelivered",
    "ReplyLost",
    "RequestTimeout",
    "ReservationClosedError",
    "ReservationNotFoundError",
    "UnauthorizedError",
    "UsageMissing",
    "UsageUnrecognized",
    "WrongLaneError",
    "refusal_for",
    "refusal_from_wire",
]


class BudgetClientError(Exception):
    """Root of every SDK error; ``code`` is machine-readable and never renamed."""

    code: str = "client_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class CommandRefused(BudgetClientError):
    """The worker answered and refused the command; nothing was changed.

    Raised as is for a code newer than this client (``body`` is then None),
    so that adding a code to the contract never breaks an older client.
    """

    code = "command_refused"

    def __init__(
        self,
        code: str,
        message: str,
        *,
        requested_tokens: int | None = None,
        available_tokens: int | None = None,
        errors: list[ValidationIssue] | None = None,
        body: ErrorBody | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.requested_tokens = requested_tokens
        self.available_tokens = available_tokens
        self.errors = errors
        self.body = body

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidCommandError(CommandRefused):
    pass


class AgentNotFoundError(CommandRefused):
    pass


class BudgetNotFoundError(CommandRefused):
    pass


class InsufficientBudgetError(CommandRefused):
    """Not enough tokens left. For an agent in a group, ``limited_by`` names
    the first level from the agent upward that lacked room: the agent's own
    id, or a group's; None for an agent in no group."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        requested_tokens: int | None = None,
        available_tokens: int | None = None,
        errors: list[ValidationIssue] | None = None,
        body: ErrorBody | None = None,
        limited_by: str | None = None,
    ) -> None:
        super().__init__(
            code,
            message,
            requested_tokens=requested_tokens,
            available_tokens=available_tokens,
            errors=errors,
            body=body,
        )
        self.limited_by = limited_by


class ConflictError(CommandRefused):
    """The message_id was already used for a different command."""


class BalanceOverflowError(CommandRefused):
    pass


class DatabaseRejectedError(CommandRefused):
    pass


class GroupNotFoundError(CommandRefused):
    """A group id nobody registered (``register_group``), as a parent, a
    member's group or the target of a group command."""


class HoldsOpenError(CommandRefused):
    """``set_group`` of an agent with open reservations: commit or release
    them (or let them expire) first, then move it."""


class UnauthorizedError(CommandRefused):
    """The worker enforces ``BUDGET_AUTH=user-id`` and this client's broker user
    may not send this command, or the client sent no ``user_id`` (pass
    ``user_id`` to ``BudgetClient``). Nothing was changed or recorded; a retry
    from the same user is refused again."""


class ReservationNotFoundError(CommandRefused):
    """``commit`` or ``release`` of a reservation this agent never made."""


class ReservationClosedError(CommandRefused):
    """The reservation was already committed, released or expired (the message
    says which). An expired hold cannot be committed: record the usage with
    ``consume`` if it must count, and give later holds a longer ``ttl_seconds``."""


class WrongLaneError(CommandRefused):
    """The command reached a lane that is not its agent's and was dead-lettered,
    not applied: it was published to a lane queue directly, or the lanes'
    bindings were changed. Publish to ``budget.commands`` (the SDK does)."""


class RequestTimeout(BudgetClientError):
    """No reply in time. The command may or may not have been applied: retry
    with the SAME message_id, which the worker deduplicates, to find out."""

    code = "timeout"


class ReplyLost(RequestTimeout):
    """The channel or connection carrying the reply closed before it came.
    Same meaning and same remedy as a timeout, without waiting for it."""

    code = "reply_lost"


class NoWorker(RequestTimeout):
    """No worker consumes the lanes, so nobody will answer now. A state change
    already published waits in its lane for a worker; retry it with the same
    message_id once one runs."""

    code = "no_worker"


class NotDelivered(BudgetClientError):
    """The broker did not confirm the command, or returned it unroutable (no
    lane bound: the worker never declared its topology). Retrying with the same
    message_id is always safe, whatever the broker did."""

    code = "not_delivered"


class BrokerUnavailable(NotDelivered):
    """No connection to the broker could be made, so nothing was published."""

    code = "broker_unavailable"


class InvalidReply(BudgetClientError):
    """A reply that is not the contract's JSON: a bug or a foreign publisher."""

    code = "invalid_reply"


class UsageMissing(BudgetClientError):
    """An LLM response that says nothing of its token usage (a stream without
    ``include_usage``, a cut-off stream). Nothing was charged: count the call
    some other way rather than book it as free."""

    code = "usage_missing"


class UsageUnrecognized(UsageMissing):
    """An object that is no response of a library ``usage_from`` knows."""

    code = "usage_unrecognized"


_BY_CODE: dict[str, type[CommandRefused]] = {
    ErrorCode.INVALID_COMMAND: InvalidCommandError,
    ErrorCode.AGENT_NOT_FOUND: AgentNotFoundError,
    ErrorCode.BUDGET_NOT_FOUND: BudgetNotFoundError,
    ErrorCode.INSUFFICIENT_BUDGET: InsufficientBudgetError,
    ErrorCode.CONFLICT: ConflictError,
    ErrorCode.BALANCE_OVERFLOW: BalanceOverflowError,
    ErrorCode.DATABASE_REJECTED: DatabaseRejectedError,
    ErrorCode.RESERVATION_NOT_FOUND: ReservationNotFoundError,
    ErrorCode.RESERVATION_CLOSED: ReservationClosedError,
    ErrorCode.UNAUTHORIZED: UnauthorizedError,
    ErrorCode.WRONG_LANE: WrongLaneError,
    ErrorCode.GROUP_NOT_FOUND: GroupNotFoundError,
    ErrorCode.HOLDS_OPEN: HoldsOpenError,
}


def refusal_for(body: ErrorBody) -> CommandRefused:
    """The exception that stands for ``body``, by its code."""
    cls = _BY_CODE.get(str(body.code), CommandRefused)
    refusal = cls(
        str(body.code),
        body.message,
        requested_tokens=body.requested_tokens,
        available_tokens=body.available_tokens,
        errors=body.errors,
        body=body,
    )
    return _limited(refusal, body.limited_by)


def refusal_from_wire(error: Any) -> CommandRefused:
    """Like ``refusal_for`` for the raw ``error`` object of a reply, tolerating
    codes and detail fields this version of the contract does not know."""
    try:
        return refusal_for(ErrorBody.model_validate(error))
    except ValidationError:
        pass
    if not isinstance(error, Mapping) or not isinstance(error.get("code"), str):
        raise InvalidReply(f"error reply without a code: {error!r}"[:500])
    requested = error.get("requested_tokens")
    available = error.get("available_tokens")
    limited_by = error.get("limited_by")
    refusal = _BY_CODE.get(error["code"], CommandRefused)(
        error["code"],
        str(error.get("message", "")),
        requested_tokens=requested if isinstance(requested, int) else None,
        available_tokens=available if isinstance(available, int) else None,
    )
    return _limited(refusal, limited_by if isinstance(limited_by, str) else None)


def _limited(refusal: CommandRefused, limited_by: str | None) -> CommandRefused:
    # Set after construction: every other class keeps CommandRefused's signature.
    if isinstance(refusal, InsufficientBudgetError):
        refusal.limited_by = limited_by
    return refusal
