"""The budget rules as pure functions over in-memory state.

The service loads the state of a batch's agents under a database lock, runs
these rules in delivery order, and writes back what changed; CHECK constraints
and compare-and-set updates stay the last guard. The rules of holds live in
``reservations``; thresholds in ``thresholds``; the state in ``state``.
"""

from token_budget.schemas import (
    MAX_BALANCE,
    Allocate,
    Command,
    Commit,
    Consume,
    ExpireReservations,
    GetAvailable,
    GetBudget,
    OkReply,
    RegisterAgent,
    Release,
    Reserve,
    SetPeriod,
    SetThresholds,
)
from token_budget.worker.domain import periods, reservations
from token_budget.worker.domain.errors import (
    AgentNotFound,
    BalanceOverflow,
    BudgetNotFound,
    InsufficientBudget,
)
from token_budget.worker.domain.state import AgentState, Change, RuleContext, record, view
from token_budget.worker.domain.thresholds import use

__all__ = ["AgentState", "Change", "RuleContext", "apply_rule", "view"]


def apply_rule(
    state: AgentState, command: Command, ctx: RuleContext | None = None
) -> tuple[OkReply, Change | None]:
    """Apply one command to ``state``; raise a ``BudgetError`` to refuse it unchanged.

    Returns the reply and the command's last ledger change, if any (a commit
    writes two). Holds need ``ctx``: the clock and the command's message_id.
    Overdue holds are expired and an ended period reset by the caller first
    (``reservations.expire_due``, ``periods.roll``).
    """
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
        change = record(state, "allocate", command.tokens)
        return view(state), change
    if not state.has_budget:
        raise BudgetNotFound(state.agent_id)
    if isinstance(command, Consume):
        if command.tokens > state.available:
            raise InsufficientBudget(state.agent_id, command.tokens, state.available)
        change = use(state, "consume", command.tokens)
        return view(state), change
    if isinstance(command, GetBudget | GetAvailable | ExpireReservations):
        return view(state), None
    if isinstance(command, SetThresholds):
        state.thresholds = command.thresholds
        state.thresholds_changed = True
        return view(state), None
    if ctx is None:
        raise ValueError(f"{command.command_type.value} needs a RuleContext")
    if isinstance(command, SetPeriod):
        return periods.set_period(state, command, ctx)
    if isinstance(command, Reserve):
        return reservations.reserve(state, command, ctx)
    if isinstance(command, Commit):
        return reservations.commit(state, command, ctx)
    if isinstance(command, Release):
        return reservations.release(state, command, ctx)
    raise AssertionError(f"unhandled command {command!r}")  # pragma: no cover
