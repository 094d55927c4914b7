"""The rules of holds: reserve, commit, release, and expiry at the deadline.

Pure, like ``rules``: they change an ``AgentState`` in memory. Every change of
``reserved`` is a ledger row, so reconciliation recomputes it:

    reserve +tokens;  release, expire, settle -hold   (settle: a commit ends the hold)
    commit  +used     (only when the commit used more than 0 tokens)

A commit writes ``settle`` before ``commit``, so that no row's balance ever
shows the hold and its usage together.
"""

import uuid
from datetime import datetime, timedelta

from token_budget.schemas import Commit, OkReply, Release, Reserve
from token_budget.worker.domain.errors import (
    InsufficientBudget,
    ReservationClosed,
    ReservationNotFound,
)
from token_budget.worker.domain.state import (
    AgentState,
    Change,
    Hold,
    HoldStatus,
    RuleContext,
    record,
    view,
)
from token_budget.worker.domain.thresholds import use

__all__ = [
    "commit",
    "expire_due",
    "expiry_message_id",
    "release",
    "reservation_id_for",
    "reserve",
]

#: Reservation ids are UUIDv5 of the reserve's message_id in this namespace,
#: so a retried reserve names the same reservation without a lookup.
_NAMESPACE = uuid.UUID("0d5f3c1e-5b1a-4d8e-9a57-6b1f2f0c7e42")


def reservation_id_for(message_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, message_id))


def expiry_message_id(reservation_id: str) -> str:
    """The ledger ``message_id`` of an expiry: no command carries it."""
    return f"expire:{reservation_id}"


def reserve(state: AgentState, command: Reserve, ctx: RuleContext) -> tuple[OkReply, Change]:
    if ctx.message_id is None:
        raise ValueError("a reserve needs its message_id: it names the reservation")
    if command.tokens > state.available:
        raise InsufficientBudget(state.agent_id, command.tokens, state.available)
    reservation_id = reservation_id_for(ctx.message_id)
    ttl = command.ttl_seconds if command.ttl_seconds is not None else ctx.default_ttl
    hold = Hold(
        reservation_id=reservation_id,
        agent_id=state.agent_id,
        tokens=command.tokens,
        expires_at=ctx.now + timedelta(seconds=ttl),
        created_at=ctx.now,
        message_id=ctx.message_id,
    )
    state.holds[reservation_id] = hold
    state.reserved += command.tokens
    change = record(state, "reserve", command.tokens, reservation_id=reservation_id)
    reply = view(state).model_copy(
        update={"reservation_id": reservation_id, "expires_at": hold.expires_at}
    )
    return reply, change


def commit(state: AgentState, command: Commit, ctx: RuleContext) -> tuple[OkReply, Change]:
    hold = _open_hold(state, command.reservation_id)
    # The hold is freed first, so a commit may use more than it held when
    # the budget still has room for the difference.
    room = state.available + hold.tokens
    if command.tokens > room:
        raise InsufficientBudget(state.agent_id, command.tokens, room)
    change = _close(state, hold, HoldStatus.COMMITTED, "settle", ctx.now, ctx.message_id)
    hold.used_tokens = command.tokens
    if command.tokens:
        change = use(state, "commit", command.tokens, reservation_id=hold.reservation_id)
    return view(state), change


def release(state: AgentState, command: Release, ctx: RuleContext) -> tuple[OkReply, Change]:
    hold = _open_hold(state, command.reservation_id)
    change = _close(state, hold, HoldStatus.RELEASED, "release", ctx.now, ctx.message_id)
    return view(state), change


def expire_due(state: AgentState, now: datetime) -> list[Change]:
    """Expire every open hold whose deadline is ``now`` or earlier, oldest first."""
    if state.expired_at == now:
        return []  # holds made since then expire after ``now``
    state.expired_at = now
    if not state.holds:
        return []
    due = sorted(
        (h for h in state.holds.values() if h.is_open and h.expires_at <= now),
        key=lambda h: (h.expires_at, h.reservation_id),
    )
    return [
        _close(
            state,
            hold,
            HoldStatus.EXPIRED,
            "expire",
            now,
            expiry_message_id(hold.reservation_id),
            ledger_message_id=expiry_message_id(hold.reservation_id),
        )
        for hold in due
    ]


def _open_hold(state: AgentState, reservation_id: str) -> Hold:
    hold = state.holds.get(reservation_id)
    if hold is None or hold.agent_id != state.agent_id:
        raise ReservationNotFound(state.agent_id, reservation_id)
    if not hold.is_open:
        raise ReservationClosed(reservation_id, hold.status)
    return hold


def _close(
    state: AgentState,
    hold: Hold,
    status: str,
    kind: str,
    now: datetime,
    closed_by: str | None,
    *,
    ledger_message_id: str | None = None,
) -> Change:
    hold.status, hold.closed_at, hold.closed_by = status, now, closed_by
    state.reserved -= hold.tokens
    return record(
        state,
        kind,
        hold.tokens,
        message_id=ledger_message_id,
        reservation_id=hold.reservation_id,
    )
