"""Stable, machine-readable error codes: the `error.code` of a failure reply."""

from enum import StrEnum

__all__ = ["ErrorCode"]


class ErrorCode(StrEnum):
    """Every code a reply, an event or a dead letter can carry.

    Values are wire literals: never rename one, only add.
    """

    INVALID_COMMAND = "invalid_command"
    AGENT_NOT_FOUND = "agent_not_found"
    BUDGET_NOT_FOUND = "budget_not_found"
    INSUFFICIENT_BUDGET = "insufficient_budget"
    CONFLICT = "conflict"
    BALANCE_OVERFLOW = "balance_overflow"
    DATABASE_REJECTED = "database_rejected"
    #: BUDGET_AUTH=user-id: the sender's validated ``user_id`` may not send this command.
    UNAUTHORIZED = "unauthorized"
    #: ``commit`` or ``release`` of a reservation this agent never made.
    RESERVATION_NOT_FOUND = "reservation_not_found"
    #: ``commit`` or ``release`` of a reservation already committed, released or expired.
    RESERVATION_CLOSED = "reservation_closed"
    #: The command arrived on a lane that is not its agent's (published to a
    #: lane directly, or the lanes' bindings changed): dead-lettered, never
    #: applied out of the agent's order.
    WRONG_LANE = "wrong_lane"
    #: A group id nobody registered (``register_group``).
    GROUP_NOT_FOUND = "group_not_found"
    #: ``set_group`` of an agent with open holds: commit or release them first.
    HOLDS_OPEN = "holds_open"
