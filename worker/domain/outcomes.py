"""What a lane hands the service and what it gets back: no AMQP, no SQL."""

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from token_budget.schemas import Command, Reply

__all__ = [
    "CommandApplier",
    "Envelope",
    "Fence",
    "Outcome",
    "OutcomeKind",
    "PendingEvent",
]


@dataclass(frozen=True, slots=True)
class Envelope:
    """A validated command and its identity (the AMQP ``message_id``)."""

    command: Command
    message_id: str | None


class OutcomeKind(StrEnum):
    """How a command ended; the lane settles each kind (broker/acks.py)."""

    APPLIED = "applied"
    REFUSED = "refused"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    QUERY = "query"
    QUERY_REFUSED = "query_refused"
    #: The database refused the command even alone (a constraint it broke):
    #: the lane dead-letters it with the reason.
    REJECTED = "rejected"
    #: Refused by the authorization policy before the batch reached the
    #: database: answered like a refusal, never recorded (worker/broker/auth.py).
    UNAUTHORIZED = "unauthorized"


@dataclass(frozen=True, slots=True)
class Outcome:
    """A command's result as committed: the reply and its encoded body."""

    kind: OutcomeKind
    reply: Reply
    #: The reply's encoded body; for a duplicate, the first outcome's body as stored.
    body: bytes

    @property
    def ok(self) -> bool:
        return self.reply.ok


@dataclass(frozen=True, slots=True)
class Fence:
    """The lease a lane holds: its batches commit only while it is still current."""

    partition: int
    owner: str
    epoch: int


class CommandApplier(Protocol):
    """What a lane needs of the domain."""

    async def apply(
        self, batch: Sequence[Envelope], fence: Fence | None = None
    ) -> list[Outcome]: ...


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """An outbox row not yet published: the body is final, the id is its identity."""

    id: int
    event_id: str
    routing_key: str
    event_type: str
    body: bytes
