"""Names of the broker objects that make up the contract."""

from typing import Final

__all__ = [
    "COMMANDS_EXCHANGE",
    "CONTENT_TYPE",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "DIRECT_REPLY_TO",
    "EVENTS_EXCHANGE",
    "HEADER_DUPLICATE",
    "HEADER_ERROR",
    "HEADER_ERROR_CODE",
    "HEADER_LANE",
    "LANES_EXCHANGE",
    "LANES_EXCHANGE_TYPE",
    "QUERIES_QUEUE",
    "lane_queue_name",
    "refused_routing_key",
    "threshold_routing_key",
]

#: Where producers publish: a fanout exchange whose only destination is ``LANES_EXCHANGE``.
COMMANDS_EXCHANGE: Final = "budget.commands"
#: Internal: hashes the routing key (the agent id) onto the lanes (schemas/lanes.py).
LANES_EXCHANGE: Final = "budget.lanes"
LANES_EXCHANGE_TYPE: Final = "x-modulus-hash"
#: Where ``committed`` queries go (default exchange, routing key = this name):
#: answered by any worker at once, not behind the agent's lane.
QUERIES_QUEUE: Final = "budget.queries"
EVENTS_EXCHANGE: Final = "budget.events"
DEAD_LETTER_EXCHANGE: Final = "budget.dead"
DEAD_LETTER_QUEUE: Final = "budget.dead"
DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"
CONTENT_TYPE: Final = "application/json"

#: Headers the worker sets on dead letters and replies.
HEADER_ERROR_CODE: Final = "x-budget-error-code"
HEADER_ERROR: Final = "x-budget-error"
HEADER_LANE: Final = "x-budget-lane"
HEADER_DUPLICATE: Final = "x-budget-duplicate"


def lane_queue_name(index: int) -> str:
    """The partition queue for lane ``index`` (zero-based)."""
    return f"budget.lane.{index:03d}"


def refused_routing_key(code: str) -> str:
    """Routing key of the event published for a refused fire-and-forget command."""
    return f"budget.refused.{code}"


def threshold_routing_key(percent: int) -> str:
    """Routing key of the event published when usage crosses ``percent`` of a budget."""
    return f"budget.threshold.{percent}"
