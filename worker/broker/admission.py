"""Whether a delivery joins its lane's batch: a command, on its own lane, allowed.

The lane decodes every delivery of a batch here before anything reaches the
database; what is not admitted is an ``Invalid`` (dead-lettered with its
reason) or an unauthorized outcome (answered, never recorded).
"""

from structlog.typing import FilteringBoundLogger

from token_budget.schemas import (
    COMMANDS_EXCHANGE,
    QUERIES_QUEUE,
    ErrorCode,
    LaneMap,
    is_committed_query,
)
from token_budget.worker.broker.auth import AuthPolicy, authorize, unauthorized_outcome
from token_budget.worker.broker.consumer import Delivery
from token_budget.worker.broker.decode import Invalid
from token_budget.worker.broker.delivery import decode_delivery
from token_budget.worker.broker.wire_guard import clean_text
from token_budget.worker.domain.outcomes import Envelope, Outcome

__all__ = ["admit", "refuse_unauthorized"]


def admit(
    message: Delivery,
    *,
    index: int,
    max_body_bytes: int,
    queries_only: bool,
    lanes: LaneMap | None,
    log: FilteringBoundLogger,
) -> Envelope | Invalid:
    """The delivery as a command for lane ``index``, or why not.

    ``queries_only``: the lane of ``budget.queries`` (committed queries only,
    reached by the queue's name). ``lanes``: check that the command's agent
    belongs to this lane (None while draining the legacy routing, whose ring
    placed those commands, and outside a pool).
    """
    item = decode_delivery(message, max_body_bytes=max_body_bytes, routed_by_agent=not queries_only)
    if queries_only and isinstance(item, Envelope) and not is_committed_query(item.command):
        return Invalid(
            f"{QUERIES_QUEUE} answers only get_budget and get_available with "
            f'"consistency": "committed"; publish {item.command.command_type.value} '
            f"to {COMMANDS_EXCHANGE}"
        )
    if isinstance(item, Envelope) and lanes is not None:
        home = lanes.index_of(item.command.key)
        if home != index:
            # Applying it here could overtake the agent's commands queued
            # on its own lane: never out of order, so never applied.
            log.warning(
                "command_misrouted",
                agent=item.command.key,
                message_id=clean_text(message.message_id),
                home_lane=home,
            )
            return Invalid(
                f"agent {item.command.key!r} belongs to lane {home}, not lane "
                f"{index}: publish to budget.commands, never to a lane queue",
                code=ErrorCode.WRONG_LANE,
            )
    return item


def refuse_unauthorized(
    message: Delivery, item: Envelope | Invalid, policy: AuthPolicy, log: FilteringBoundLogger
) -> Outcome | None:
    """The refusal of a command ``policy`` does not allow; None if allowed."""
    if not isinstance(item, Envelope):
        return None
    error = authorize(item.command, message.user_id, policy)
    if error is None:
        return None
    log.warning(
        "command_unauthorized",
        message_id=clean_text(message.message_id),
        user_id=clean_text(message.user_id),
        agent=item.command.key,
        type=item.command.command_type.value,
    )
    return unauthorized_outcome(error)
