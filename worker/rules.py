"""The budget rules as pure functions over in-memory state.

The service loads the state of a batch's agents under a database lock, runs
these rules in delivery order, and writes back what changed; CHECK constraints
and compare-and-set updates stay the last guard.
"""

from dataclasses import dataclass, field

from schemas import (
    MAX_BALANCE,
    Allocate,
    Command,
    Consume,
    GetAvailable,
    GetBudget,
    OkReply,
    RegisterAgent,
)

from .errors import AgentNotFound, BalanceOverflow, BudgetNotFound, InsufficientBudget

__all__ = ["AgentState", "Change", "apply_rule", "view"]


@dataclass(slots=True)
class Change:
    """One ledger row: a change of an agent's balance."""

    kind: str
    amount: int
    seq: int
    allocated_after: int
    used_after: int


@dataclass(slots=True)
class AgentState:
    agent_id: str
    registered: bool = False
    has_budget: bool = False
    allocated: int = 0
    used: int = 0
    #: Last ledger sequence number; ``stored_seq`` is its value in the database.
    seq: int = 0
    stored_seq: int | None = None
    new_agent: bool = False
    changes: list[Change] = field(default_factory=list)

    @property
    def available(self) -> int:
        return self.allocated - self.used

    @property
    def dirty(self) -> bool:
        return bool(self.changes)


def view(state: AgentState) -> OkReply:
    if not state.has_budget:
        return OkReply(
            agent_id=state.agent_id,
            allocated_tokens=None,
            used_tokens=None,
            available_tokens=None,
        )
    return OkReply(
        agent_id=state.agent_id,
        allocated_tokens=state.allocated,
        used_tokens=state.used,
        available_tokens=state.available,
    )


def apply_rule(state: AgentState, command: Command) -> tuple[OkReply, Change | None]:
    """Apply one command to ``state``; raise a ``BudgetError`` to refuse it unchanged."""
    if isinstance(command, RegisterAgent):
        if not state.registered:
            state.registered = True
            state.new_agent = True
        return view(state), None
    if not state.registered:
        raise AgentNotFound(state.agent_id)
    if isinstance(command, Allocate):
        if state.allocated + command.tokens > MAX_BALANCE:
            raise BalanceOverflow(
                f"allocating {command.tokens} would take agent {state.agent_id!r} "
                f"past the largest balance, {MAX_BALANCE}"
            )
        state.has_budget = True
        state.allocated += command.tokens
        return view(state), _record(state, "allocate", command.tokens)
    if not state.has_budget:
        raise BudgetNotFound(state.agent_id)
    if isinstance(command, Consume):
        if command.tokens > state.available:
            raise InsufficientBudget(state.agent_id, command.tokens, state.available)
        state.used += command.tokens
        return view(state), _record(state, "consume", command.tokens)
    if isinstance(command, GetBudget | GetAvailable):
        return view(state), None
    raise AssertionError(f"unhandled command {command!r}")  # pragma: no cover


def _record(state: AgentState, kind: str, amount: int) -> Change:
    state.seq += 1
    change = Change(kind, amount, state.seq, state.allocated, state.used)
    state.changes.append(change)
    return change
