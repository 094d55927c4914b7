"""The one root exception of the domain, each subclass with a stable wire code."""

from token_budget.schemas import ErrorBody, ErrorCode

__all__ = [
    "AgentNotFound",
    "BalanceOverflow",
    "BudgetError",
    "BudgetNotFound",
    "Conflict",
    "GroupNotFound",
    "HoldsOpen",
    "InsufficientBudget",
    "InvalidCommand",
    "ReservationClosed",
    "ReservationNotFound",
]


class BudgetError(Exception):
    """A command refused by the rules: an outcome to answer, not a crash."""

    code: ErrorCode = ErrorCode.INVALID_COMMAND

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message)


class InvalidCommand(BudgetError):
    code = ErrorCode.INVALID_COMMAND


class AgentNotFound(BudgetError):
    code = ErrorCode.AGENT_NOT_FOUND

    def __init__(self, agent_id: str) -> None:
        super().__init__(f"agent {agent_id!r} is not registered")


class BudgetNotFound(BudgetError):
    code = ErrorCode.BUDGET_NOT_FOUND

    def __init__(self, agent_id: str) -> None:
        super().__init__(f"agent {agent_id!r} has no budget yet: allocate first")


class InsufficientBudget(BudgetError):
    code = ErrorCode.INSUFFICIENT_BUDGET

    def __init__(
        self,
        agent_id: str,
        requested: int,
        available: int,
        *,
        limited_by: str | None = None,
        message: str | None = None,
    ) -> None:
        super().__init__(
            message or f"agent {agent_id!r} asked for {requested} tokens, {available} available"
        )
        self.requested = requested
        self.available = available
        #: Set for an agent in a group: the level that lacked room.
        self.limited_by = limited_by

    def to_body(self) -> ErrorBody:
        return ErrorBody(
            code=self.code,
            message=self.message,
            requested_tokens=self.requested,
            available_tokens=self.available,
            limited_by=self.limited_by,
        )


class GroupNotFound(BudgetError):
    code = ErrorCode.GROUP_NOT_FOUND

    def __init__(self, group_id: str) -> None:
        super().__init__(f"group {group_id!r} is not registered: register_group first")


class HoldsOpen(BudgetError):
    code = ErrorCode.HOLDS_OPEN

    def __init__(self, agent_id: str, reserved: int) -> None:
        super().__init__(
            f"agent {agent_id!r} holds {reserved} tokens in open reservations: "
            "commit or release them before moving it to another group"
        )


class BalanceOverflow(BudgetError):
    code = ErrorCode.BALANCE_OVERFLOW


class Conflict(BudgetError):
    code = ErrorCode.CONFLICT

    def __init__(self, message_id: str) -> None:
        super().__init__(f"message_id {message_id!r} was already used for a different command")

    @classmethod
    def of_id(cls, some_id: str, taken_as: str) -> "Conflict":
        """An id already taken otherwise (agents and groups share one namespace)."""
        conflict = cls.__new__(cls)
        BudgetError.__init__(conflict, f"{some_id!r} is already {taken_as}")
        return conflict


class ReservationNotFound(BudgetError):
    code = ErrorCode.RESERVATION_NOT_FOUND

    def __init__(self, agent_id: str, reservation_id: str) -> None:
        super().__init__(f"agent {agent_id!r} has no reservation {reservation_id!r}")


class ReservationClosed(BudgetError):
    code = ErrorCode.RESERVATION_CLOSED

    def __init__(self, reservation_id: str, status: str) -> None:
        super().__init__(f"reservation {reservation_id!r} is already {status}")
        self.status = status
