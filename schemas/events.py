"""Events the worker publishes on ``budget.events`` from its outbox."""

from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from .commands import AgentId, CommandType

__all__ = ["THRESHOLD_CROSSED", "ThresholdCrossedEvent"]

THRESHOLD_CROSSED: Final = "threshold_crossed"


class ThresholdCrossedEvent(BaseModel):
    """Usage reached ``threshold`` percent of the budget: published once per crossing.

    Routing key ``budget.threshold.<threshold>``. The AMQP ``message_id`` is
    ``event_id``: a worker that dies after publishing and before recording the
    publication publishes the same event again, with the same id and body.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    event: Literal["threshold_crossed"] = "threshold_crossed"
    #: Stable identity of this crossing; deduplicate on it.
    event_id: str
    agent_id: AgentId
    #: Percent of ``allocated_tokens``: crossed when ``used_tokens * 100 >= threshold * allocated``.
    threshold: Annotated[int, Field(ge=1, le=100)]
    allocated_tokens: int
    used_tokens: int
    reserved_tokens: int
    #: The command whose usage crossed it: ``consume`` or ``commit``.
    command_type: CommandType
    message_id: str
    #: The ledger row of that usage (per agent, from 1).
    ledger_seq: int
    #: When the usage was applied (not when published): the same in every copy.
    occurred_at: datetime
    #: Set for a group's threshold: the budget fields are the group's, and
    #: ``agent_id``, ``message_id``, ``ledger_seq`` name the member's usage.
    group_id: AgentId | None = None
