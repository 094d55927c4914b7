"""Who may send which command: the rule table of ``BUDGET_AUTH=user-id``.

The sender is the AMQP ``user_id`` property, which RabbitMQ validates against
the publishing connection's user. An agent's user is, by convention, the user
named like the agent. Pure: no AMQP, no SQL, so the lane asks it before a
command can reach the database, and the tests ask it for every case.
"""

from dataclasses import dataclass

from token_budget.schemas import (
    Command,
    CommandType,
    ErrorBody,
    ErrorCode,
    ErrorReply,
    encode_reply,
)
from token_budget.worker.domain.outcomes import Outcome, OutcomeKind
from token_budget.worker.settings import AuthMode, Settings
from token_budget.worker.urls import broker_user

__all__ = ["AGENT_OWN", "AuthPolicy", "authorize", "unauthorized_outcome"]

#: What an agent's own user may send for that agent: spending and reading its
#: budget. Every other command type is for admin users only: allocating and
#: registering, setting thresholds, and any type added to the contract later
#: until it is listed here (deny by default). Internal commands (the sweeper's
#: ``expire_reservations``) also come from the workers' own broker user.
AGENT_OWN = frozenset(
    {
        CommandType.CONSUME,
        CommandType.GET_BUDGET,
        CommandType.GET_AVAILABLE,
        CommandType.RESERVE,
        CommandType.COMMIT,
        CommandType.RELEASE,
    }
)


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """Who may send which command (``BUDGET_AUTH``): checked per command, before the database."""

    mode: AuthMode = AuthMode.NONE
    admin_users: frozenset[str] = frozenset()
    #: The broker user the workers connect as: it holds every queue already,
    #: and its internal commands carry it as their validated ``user_id``.
    worker_user: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "AuthPolicy":
        worker_user = broker_user(settings.amqp_url.get_secret_value())
        return cls(settings.auth, frozenset(settings.admin_users), worker_user)

    @property
    def enforced(self) -> bool:
        return self.mode is not AuthMode.NONE


def authorize(command: Command, sender: str | None, policy: AuthPolicy) -> ErrorBody | None:
    """None if ``sender`` may send ``command``, else the ``unauthorized`` error to answer."""
    if not policy.enforced:
        return None
    if not sender:
        return _refusal("the command carries no user_id; this worker requires one")
    if sender in policy.admin_users:
        return None
    kind = command.command_type
    # repr() keeps the message printable whatever bytes the sender name holds.
    if command.internal:
        if sender == policy.worker_user:
            return None
        return _refusal(
            f"user {sender!r} may not {kind.value}: only the workers and admin users may"
        )
    if kind in AGENT_OWN and command.for_group:
        return _refusal(
            f"user {sender!r} may not {kind.value} for group {command.key!r}: "
            "only admin users may act on a group's budget"
        )
    if kind in AGENT_OWN and sender == command.key:
        return None
    if kind in AGENT_OWN:
        return _refusal(
            f"user {sender!r} may not {kind.value} for agent {command.key!r}: "
            "an agent's user may act only on its own budget"
        )
    return _refusal(f"user {sender!r} may not {kind.value}: only admin users may")


def unauthorized_outcome(error: ErrorBody) -> Outcome:
    """The outcome a lane answers with for a command ``authorize`` refused."""
    reply = ErrorReply(error=error)
    return Outcome(OutcomeKind.UNAUTHORIZED, reply, encode_reply(reply))


def _refusal(message: str) -> ErrorBody:
    return ErrorBody(code=ErrorCode.UNAUTHORIZED, message=message)
