"""The agents' SDK: publish budget commands with confirms, RPC with timeouts, typed errors."""

from schemas import BudgetView, OkReply

from .client import BudgetClient, ReplyQueue, new_message_id
from .errors import (
    AgentNotFoundError,
    BalanceOverflowError,
    BrokerUnavailable,
    BudgetClientError,
    BudgetNotFoundError,
    CommandRefused,
    ConflictError,
    DatabaseRejectedError,
    InsufficientBudgetError,
    InvalidCommandError,
    InvalidReply,
    NotDelivered,
    ReplyLost,
    RequestTimeout,
    ReservationClosedError,
    ReservationNotFoundError,
    UnauthorizedError,
    WrongLaneError,
    refusal_for,
    refusal_from_wire,
)
from .reservations import Reservation, ReservationScope

__all__ = [
    "AgentNotFoundError",
    "BalanceOverflowError",
    "BrokerUnavailable",
    "BudgetClient",
    "BudgetClientError",
    "BudgetNotFoundError",
    "BudgetView",
    "CommandRefused",
    "ConflictError",
    "DatabaseRejectedError",
    "InsufficientBudgetError",
    "InvalidCommandError",
    "InvalidReply",
    "NotDelivered",
    "OkReply",
    "ReplyLost",
    "ReplyQueue",
    "RequestTimeout",
    "Reservation",
    "ReservationClosedError",
    "ReservationNotFoundError",
    "ReservationScope",
    "UnauthorizedError",
    "WrongLaneError",
    "new_message_id",
    "refusal_for",
    "refusal_from_wire",
]
