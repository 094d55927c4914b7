"""Group budgets: org → team → agent, every level charged with the agent.

Pure, like ``rules``. A group's usage is the sum of its members' usage and
holds, sub-groups' included: every ledger change of a member moves each
group of its chain by the same effect (``EFFECTS``), in the member's
transaction, so all levels change together or not at all. A group without an
allocation limits nobody. A charge is checked at every level before it is
applied; the first level from the agent upward that lacks room refuses it.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from token_budget.schemas import (
    DEFAULT_THRESHOLDS,
    MAX_BALANCE,
    Allocate,
    Command,
    Commit,
    Consume,
    GetAvailable,
    GetBudget,
    OkReply,
    Period,
    RegisterAgent,
    RegisterGroup,
    Reserve,
    SetGroup,
    SetPeriod,
    SetThresholds,
)
from token_budget.worker.domain.calendar import bounds, local
from token_budget.worker.domain.errors import (
    AgentNotFound,
    BalanceOverflow,
    Conflict,
    GroupNotFound,
    HoldsOpen,
    InsufficientBudget,
    InvalidCommand,
)
from token_budget.worker.domain.periods import reset_message_id
from token_budget.worker.domain.rules import apply_rule
from token_budget.worker.domain.state import AgentState, Change, RuleContext, view
from token_budget.worker.domain.thresholds import crossed

__all__ = [
    "EFFECTS",
    "MAX_GROUP_DEPTH",
    "GroupChange",
    "GroupCrossing",
    "GroupState",
    "apply_agent",
    "apply_group",
    "group_view",
    "roll_group",
    "spread",
]

#: How each kind of ledger row moves a balance: (allocated, used, reserved)
#: per token of its amount (the audit's sums use the same table).
EFFECTS: dict[str, tuple[int, int, int]] = {
    "allocate": (1, 0, 0),
    "consume": (0, 1, 0),
    "reserve": (0, 0, 1),
    "release": (0, 0, -1),
    "expire": (0, 0, -1),
    "settle": (0, 0, -1),
    "commit": (0, 1, 0),
    "reset": (0, -1, 0),
}
#: Levels of groups above an agent, at most (org → team → sub-team → …).
MAX_GROUP_DEPTH = 8


@dataclass(slots=True)
class GroupChange:
    """One row of a group's own ledger: an allocation or a reset."""

    kind: str
    amount: int
    seq: int
    allocated_after: int
    used_after: int
    reserved_after: int
    message_id: str | None = None
    period_start: datetime | None = None


@dataclass(frozen=True, slots=True)
class GroupCrossing:
    """A member's usage took the group over ``threshold`` percent."""

    threshold: int
    agent_id: str
    agent_seq: int
    message_id: str
    allocated: int
    used: int
    reserved: int
    command_type: str


@dataclass(slots=True)
class GroupState:
    """One group's budget, loaded (and locked) once per batch."""

    group_id: str
    registered: bool = False
    parent_id: str | None = None
    #: This group and its ancestors, nearest first (fixed at registration).
    chain: tuple[str, ...] = ()
    allocated: int | None = None
    used: int = 0
    reserved: int = 0
    thresholds: tuple[int, ...] | None = None
    period: Period | None = None
    timezone: str | None = None
    period_start: datetime | None = None
    resets_at: datetime | None = None
    seq: int = 0
    #: Bumped by every write; the compare-and-set of the update.
    version: int = 0
    stored_version: int | None = None
    new_group: bool = False
    changed: bool = False
    changes: list[GroupChange] = field(default_factory=list)
    crossings: list[GroupCrossing] = field(default_factory=list)

    @property
    def available(self) -> int | None:
        if self.allocated is None:
            return None
        return self.allocated - self.used - self.reserved

    def record(
        self,
        kind: str,
        amount: int,
        message_id: str | None = None,
        period_start: datetime | None = None,
    ) -> GroupChange:
        self.seq += 1
        change = GroupChange(
            kind,
            amount,
            self.seq,
            self.allocated or 0,
            self.used,
            self.reserved,
            message_id,
            period_start,
        )
        self.changes.append(change)
        return change


def group_view(group: GroupState) -> OkReply:
    reply = OkReply.model_construct(
        group_id=group.group_id,
        allocated_tokens=group.allocated,
        used_tokens=group.used,
        reserved_tokens=group.reserved,
        available_tokens=group.available,
    )
    if group.period is None or group.timezone is None:
        return reply
    assert group.period_start is not None and group.resets_at is not None
    return reply.model_copy(
        update={
            "period": group.period,
            "timezone": group.timezone,
            "period_start": local(group.period_start, group.timezone),
            "resets_at": local(group.resets_at, group.timezone),
        }
    )


def roll_group(group: GroupState, now: datetime) -> None:
    """A group's period reset: its usage, not its members' (see ``periods.roll``)."""
    if group.resets_at is None or now < group.resets_at:
        return
    assert group.period is not None and group.timezone is not None
    ended = group.period_start
    group.period_start, group.resets_at = bounds(group.period, group.timezone, now)
    group.changed = True
    if group.used:
        tokens, group.used = group.used, 0
        group.record("reset", tokens, reset_message_id(group.period_start), ended)


def apply_group(
    group: GroupState,
    command: Command,
    ctx: RuleContext,
    *,
    parent: GroupState | None = None,
    is_agent: bool = False,
) -> OkReply:
    """A command about a group; raise a ``BudgetError`` to refuse it unchanged."""
    if isinstance(command, RegisterGroup):
        return _register(group, command, parent, is_agent)
    if not group.registered:
        raise GroupNotFound(group.group_id)
    if isinstance(command, Allocate):
        after = (group.allocated or 0) + command.tokens
        if after > MAX_BALANCE:
            raise BalanceOverflow(
                f"allocating {command.tokens} would take group past {MAX_BALANCE}"
            )
        held = group.used + group.reserved
        if held > after:
            raise InsufficientBudget(
                group.group_id,
                held,
                after,
                limited_by=group.group_id,
                message=f"group {group.group_id!r} already uses and holds {held} tokens: "
                f"allocate at least {held}, or set a period first",
            )
        group.allocated = after
        group.changed = True
        group.record("allocate", command.tokens, ctx.message_id)
    elif isinstance(command, SetThresholds):
        group.thresholds = command.thresholds
        group.changed = True
    elif isinstance(command, SetPeriod):
        if command.period is None:
            group.period = group.timezone = group.period_start = group.resets_at = None
        else:
            group.period, group.timezone = command.period, command.timezone
            group.period_start, group.resets_at = bounds(command.period, command.timezone, ctx.now)
        group.changed = True
    elif not isinstance(command, GetBudget | GetAvailable):
        raise InvalidCommand(f"{command.command_type.value} takes an agent_id, not a group_id")
    return group_view(group)


def _register(
    group: GroupState, command: RegisterGroup, parent: GroupState | None, is_agent: bool
) -> OkReply:
    if is_agent:
        raise Conflict.of_id(command.group_id, "an agent's id: agents and groups share ids")
    if group.registered:
        if group.parent_id != command.parent_id:
            under = "a root" if group.parent_id is None else f"under {group.parent_id!r}"
            raise Conflict.of_id(command.group_id, f"a group {under}: groups never move")
        return group_view(group)
    if command.parent_id is not None:
        if parent is None or not parent.registered:
            raise GroupNotFound(command.parent_id)
        if len(parent.chain) >= MAX_GROUP_DEPTH:
            raise InvalidCommand(f"groups nest at most {MAX_GROUP_DEPTH} levels deep")
    group.registered = group.new_group = group.changed = True
    group.parent_id = command.parent_id
    group.chain = (command.group_id, *(parent.chain if parent is not None else ()))
    return group_view(group)


def apply_agent(
    state: AgentState,
    command: Command,
    ctx: RuleContext,
    chain: Sequence[GroupState],
    *,
    target: GroupState | None = None,
    is_group: bool = False,
) -> tuple[OkReply, Change | None]:
    """``apply_rule`` with the agent's groups: checked before, charged after.

    ``chain``: the agent's groups, nearest first. ``target``: the group a
    ``register_agent`` or ``set_group`` names (None: unknown or none named).
    """
    if isinstance(command, RegisterAgent | SetGroup):
        return _membership(state, command, target, is_group), None
    need = _demand(state, command)
    if need and chain:
        for group in chain:
            available = group.available
            if available is not None and need > available:
                raise InsufficientBudget(
                    state.agent_id,
                    need,
                    available,
                    limited_by=group.group_id,
                    message=f"agent {state.agent_id!r} asked for {need} tokens; its group "
                    f"{group.group_id!r} has {available} available",
                )
    mark = len(state.changes)
    try:
        reply, change = apply_rule(state, command, ctx)
    except InsufficientBudget as refusal:
        if chain:
            refusal.limited_by = state.agent_id
        raise
    spread(chain, state.changes[mark:], state.agent_id, ctx.message_id or "")
    return reply, change


def _membership(
    state: AgentState, command: RegisterAgent | SetGroup, target: GroupState | None, is_group: bool
) -> OkReply:
    wanted = command.group_id
    if isinstance(command, RegisterAgent):
        if is_group:
            raise Conflict.of_id(command.agent_id, "a group's id: agents and groups share ids")
        if state.registered:
            if wanted is not None and wanted != state.group_id:
                where = "in no group" if state.group_id is None else f"in group {state.group_id!r}"
                raise Conflict.of_id(
                    command.agent_id, f"registered {where}: move it with set_group"
                )
            return view(state)
    elif not state.registered:
        raise AgentNotFound(state.agent_id)
    if wanted is not None and (target is None or not target.registered):
        raise GroupNotFound(wanted)
    if isinstance(command, SetGroup) and state.reserved:
        raise HoldsOpen(state.agent_id, state.reserved)
    if isinstance(command, RegisterAgent):
        state.registered = state.new_agent = True
    if state.group_id != wanted:
        state.group_id, state.group_changed = wanted, True
    return view(state)


def _demand(state: AgentState, command: Command) -> int:
    """How much ``used + reserved`` would grow if the agent itself accepts it (else 0)."""
    if not state.has_budget:
        return 0
    if isinstance(command, Consume | Reserve):
        return command.tokens if command.tokens <= state.available else 0
    if isinstance(command, Commit):
        hold = state.holds.get(command.reservation_id)
        if hold is None or not hold.is_open or command.tokens > state.available + hold.tokens:
            return 0
        return max(command.tokens - hold.tokens, 0)
    return 0


def spread(
    chain: Iterable[GroupState], changes: Sequence[Change], agent_id: str, message_id: str
) -> None:
    """Move every group of ``chain`` by the effect of the member's ``changes``."""
    for change in changes:
        _, used, reserved = EFFECTS.get(change.kind, (0, 0, 0))
        if change.kind == "reset" or not (used or reserved):
            continue  # an agent's own period resets only the agent
        for group in chain:
            before = group.used
            group.used += used * change.amount
            group.reserved += reserved * change.amount
            group.changed = True
            if used > 0 and group.allocated:
                thresholds = DEFAULT_THRESHOLDS if group.thresholds is None else group.thresholds
                for p in crossed(thresholds, group.allocated, before, group.used):
                    group.crossings.append(
                        GroupCrossing(
                            p,
                            agent_id,
                            change.seq,
                            message_id,
                            group.allocated,
                            group.used,
                            group.reserved,
                            change.kind,
                        )
                    )
