"""The one place that decides what happens to a delivery after its batch.

FastStream calls this the acknowledgement watcher. Every path a delivery can
take ends here: applied or refused, by the rules or by the authorization
policy (an outcome: answer and acknowledge), invalid or rejected by the
database (dead-letter with the reason, answer if asked, acknowledge),
database away (hold, retry the same batch later), or an unexpected failure
(return everything unacknowledged to the broker, whose delivery limit
dead-letters a message that keeps failing).
"""

from dataclasses import dataclass
from enum import StrEnum

from token_budget.schemas import ErrorCode
from token_budget.worker.broker.decode import Invalid
from token_budget.worker.domain.outcomes import Outcome, OutcomeKind
from token_budget.worker.errors import Fenced, StorageUnavailable

__all__ = ["Disposition", "Settlement", "settle", "settle_failure"]


class Disposition(StrEnum):
    """What becomes of a delivery or a whole batch; ``Lane._act`` carries it out."""

    #: Covered by the batch's single ``multiple=True`` acknowledgement.
    ACK = "ack"
    #: Published to ``budget.dead`` (confirmed) before the batch's acknowledgement.
    DEAD_LETTER = "dead_letter"
    #: Keep the batch unacknowledged and apply it again after a backoff.
    RETRY = "retry"
    #: Close the lane's channel: the broker requeues every unacknowledged delivery.
    REQUEUE = "requeue"


@dataclass(frozen=True, slots=True)
class Settlement:
    """One delivery's fate after its batch committed, and what to announce."""

    disposition: Disposition
    #: Publish a ``command_refused`` event (refused, fire-and-forget).
    event: bool = False
    error_code: ErrorCode | None = None
    reason: str | None = None


#: Refusals announced as events when fire-and-forget. UNAUTHORIZED covers
#: queries too: an attempt on another agent's budget deserves a trace.
_REFUSALS = frozenset(
    {OutcomeKind.REFUSED, OutcomeKind.DUPLICATE, OutcomeKind.CONFLICT, OutcomeKind.UNAUTHORIZED}
)


def settle(result: Outcome | Invalid, *, has_reply_to: bool) -> Settlement:
    """The fate of one delivery whose batch was applied and committed."""
    if isinstance(result, Invalid):
        return Settlement(Disposition.DEAD_LETTER, error_code=result.code, reason=result.reason)
    if result.kind is OutcomeKind.REJECTED:
        code = result.reply.error.code if not result.reply.ok else None
        message = result.reply.error.message if not result.reply.ok else None
        return Settlement(Disposition.DEAD_LETTER, error_code=code, reason=message)
    # A stored refusal replayed for a redelivery is announced again: the first
    # announcement may have died with the worker that made it (at least once).
    refused = not result.reply.ok and result.kind in _REFUSALS
    return Settlement(Disposition.ACK, event=refused and not has_reply_to)


def settle_failure(error: BaseException) -> Disposition:
    """The fate of a whole batch whose transaction did not commit.

    A fenced lane (its partition passed to another worker) requeues too, and
    stops for good: the new owner applies the batch.
    """
    if isinstance(error, Fenced):
        return Disposition.REQUEUE
    if isinstance(error, StorageUnavailable):
        return Disposition.RETRY
    return Disposition.REQUEUE
