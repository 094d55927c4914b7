"""An agent's state as the rules see it: balances, holds, and what changed.

Plain data, no I/O: the batch loads it from the database, the rules change it
in memory, and the batch writes back what changed.
"""

from dataclasses import dataclass, field
from datetime import datetime

from token_budget.schemas import (
    DEFAULT_RESERVATION_TTL_SECONDS,
    DEFAULT_THRESHOLDS,
    OkReply,
    Period,
)
from token_budget.worker.domain.calendar import local

__all__ = [
    "AgentState",
    "Change",
    "Crossing",
    "Hold",
    "HoldStatus",
    "RuleContext",
    "record",
    "view",
]


class HoldStatus:
    """A reservation's life: open, then exactly one of the other three."""

    OPEN = "open"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class RuleContext:
    """What a rule may need besides the state: the batch's clock, the command's id."""

    now: datetime
    message_id: str | None = None
    default_ttl: int = DEFAULT_RESERVATION_TTL_SECONDS


@dataclass(slots=True)
class Change:
    """One ledger row: a change of an agent's balance."""

    kind: str
    amount: int
    seq: int
    allocated_after: int
    used_after: int
    reserved_after: int = 0
    #: The ledger row's message_id when it is not the command's (expiry).
    message_id: str | None = None
    reservation_id: str | None = None
    #: A reset: the start of the period whose usage it sets back to 0.
    period_start: datetime | None = None


@dataclass(frozen=True, slots=True)
class Crossing:
    """Usage reached ``threshold`` percent of the budget: one event to publish."""

    threshold: int
    seq: int
    allocated: int
    used: int
    reserved: int
    command_type: str


@dataclass(slots=True)
class Hold:
    """A reservation: tokens held until committed, released or expired."""

    reservation_id: str
    agent_id: str
    tokens: int
    expires_at: datetime
    created_at: datetime
    message_id: str
    status: str = HoldStatus.OPEN
    closed_at: datetime | None = None
    #: message_id of the commit or release, or the expiry's ledger id.
    closed_by: str | None = None
    #: What the commit reported as really used.
    used_tokens: int | None = None
    #: The status stored in the database; None for a hold made in this batch.
    stored_status: str | None = None

    @property
    def is_open(self) -> bool:
        return self.status == HoldStatus.OPEN


@dataclass(slots=True)
class AgentState:
    """One agent's budget as the rules see it, loaded once per batch."""

    agent_id: str
    registered: bool = False
    has_budget: bool = False
    allocated: int = 0
    used: int = 0
    reserved: int = 0
    #: The budget's thresholds; None means the defaults (``DEFAULT_THRESHOLDS``).
    thresholds: tuple[int, ...] | None = None
    thresholds_changed: bool = False
    #: Last ledger sequence number; ``stored_seq`` is its value in the database.
    seq: int = 0
    stored_seq: int | None = None
    new_agent: bool = False
    changes: list[Change] = field(default_factory=list)
    #: The agent's open holds, and the closed ones the batch refers to, by id.
    holds: dict[str, Hold] = field(default_factory=dict)
    crossings: list[Crossing] = field(default_factory=list)
    #: The clock at which overdue holds were last expired (once per batch suffices).
    expired_at: datetime | None = None
    #: The budget's period (None: usage never resets), its zone, and the
    #: period now running: ``[period_start, resets_at)``, UTC.
    period: Period | None = None
    timezone: str | None = None
    period_start: datetime | None = None
    resets_at: datetime | None = None
    period_changed: bool = False
    #: The agent's group (None: in no group); written to ``agents`` when changed.
    group_id: str | None = None
    group_changed: bool = False

    @property
    def available(self) -> int:
        return self.allocated - self.used - self.reserved

    @property
    def effective_thresholds(self) -> tuple[int, ...]:
        return DEFAULT_THRESHOLDS if self.thresholds is None else self.thresholds

    @property
    def dirty(self) -> bool:
        return bool(self.changes) or self.thresholds_changed or self.period_changed


def view(state: AgentState) -> OkReply:
    # model_construct: the rules computed these numbers, validating them
    # again per command would cost more than applying the command.
    if not state.has_budget:
        return OkReply.model_construct(
            agent_id=state.agent_id,
            allocated_tokens=None,
            used_tokens=None,
            reserved_tokens=None,
            available_tokens=None,
        )
    if state.period is None or state.timezone is None:
        return OkReply.model_construct(
            agent_id=state.agent_id,
            allocated_tokens=state.allocated,
            used_tokens=state.used,
            reserved_tokens=state.reserved,
            available_tokens=state.available,
        )
    assert state.period_start is not None and state.resets_at is not None
    return OkReply.model_construct(
        agent_id=state.agent_id,
        allocated_tokens=state.allocated,
        used_tokens=state.used,
        reserved_tokens=state.reserved,
        available_tokens=state.available,
        period=state.period,
        timezone=state.timezone,
        period_start=local(state.period_start, state.timezone),
        resets_at=local(state.resets_at, state.timezone),
    )


def record(
    state: AgentState,
    kind: str,
    amount: int,
    *,
    message_id: str | None = None,
    reservation_id: str | None = None,
    period_start: datetime | None = None,
) -> Change:
    state.seq += 1
    change = Change(
        kind,
        amount,
        state.seq,
        state.allocated,
        state.used,
        state.reserved,
        message_id,
        reservation_id,
        period_start,
    )
    state.changes.append(change)
    return change
