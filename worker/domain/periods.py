"""Budget periods: usage goes back to 0 at each calendar boundary, once.

Pure, like ``rules``. The reset is lazy and takes its place in the agent's own
order: the batch calls ``roll`` before each of the agent's commands, so the
first command whose batch clock is at or past ``resets_at`` sees the new
period, and every later one (a redelivery, a retry, another worker after a
handover) finds ``resets_at`` already moved on in the committed state.

    reset  -used   (the usage of the period that ended; none if it was 0)

``allocated`` stays (the allowance of every period) and open holds stay
reserved: a commit counts in the period in which it is applied.
"""

from datetime import UTC, datetime

from token_budget.schemas import OkReply, SetPeriod
from token_budget.worker.domain.calendar import bounds
from token_budget.worker.domain.state import AgentState, Change, RuleContext, record, view

__all__ = ["reset_message_id", "roll", "set_period"]


def reset_message_id(period_start: datetime) -> str:
    """The ledger ``message_id`` of a reset: the period it opens (unique per agent)."""
    return f"reset:{period_start.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def roll(state: AgentState, now: datetime) -> Change | None:
    """Start the period containing ``now`` if the current one has ended.

    Only forward: a clock behind ``resets_at`` (another host's, say) changes
    nothing, so no period is reset twice however the clocks disagree.
    """
    if state.resets_at is None or now < state.resets_at:
        return None
    assert state.period is not None and state.timezone is not None
    ended = state.period_start
    state.period_start, state.resets_at = bounds(state.period, state.timezone, now)
    state.period_changed = True
    if state.used == 0:
        return None
    tokens, state.used = state.used, 0
    return record(
        state,
        "reset",
        tokens,
        message_id=reset_message_id(state.period_start),
        period_start=ended,
    )


def set_period(state: AgentState, command: SetPeriod, ctx: RuleContext) -> tuple[OkReply, None]:
    """Set or remove the period; the usage so far is kept, the first reset is
    at the next boundary, so no agent is left over budget by the change."""
    if command.period is None:
        state.period = state.timezone = state.period_start = state.resets_at = None
    else:
        state.period, state.timezone = command.period, command.timezone
        state.period_start, state.resets_at = bounds(command.period, command.timezone, ctx.now)
    state.period_changed = True
    return view(state), None
