"""Usage thresholds: which ones a change of used tokens crosses.

Whether a threshold is armed is a function of the balance, not stored state:
``p`` has fired while ``used * 100 >= p * allocated`` and is armed otherwise.
Usage only grows (consume, commit) and allocation only grows, so a threshold
fires when usage climbs over it, and is re-armed exactly when an allocation
takes usage back below it. Holds never move usage, so they never fire one.
"""

from token_budget.worker.domain.state import AgentState, Change, Crossing, record

__all__ = ["crossed", "use"]


def crossed(thresholds: tuple[int, ...], allocated: int, before: int, after: int) -> list[int]:
    """Thresholds (percent) that usage going from ``before`` to ``after`` reaches."""
    return [p for p in thresholds if before * 100 < p * allocated <= after * 100]


def use(state: AgentState, kind: str, tokens: int, *, reservation_id: str | None = None) -> Change:
    """Add ``tokens`` to usage as one ledger row, and note the thresholds it crosses."""
    before = state.used
    state.used += tokens
    change = record(state, kind, tokens, reservation_id=reservation_id)
    for threshold in crossed(state.effective_thresholds, state.allocated, before, state.used):
        state.crossings.append(
            Crossing(threshold, change.seq, state.allocated, state.used, state.reserved, kind)
        )
    return change
