"""The SQL of one batch: read its agents' state in a few queries, write it back
with one ``executemany`` per table. Runs inside the caller's transaction.
"""

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BindParameter, and_, bindparam, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from token_budget.schemas import Period
from token_budget.worker.domain.state import AgentState, Hold, HoldStatus
from token_budget.worker.errors import StorageUnavailable
from token_budget.worker.store.tables import (
    agents,
    budgets,
    ledger,
    outbox,
    processed_commands,
    reservations,
)

__all__ = [
    "StaleState",
    "Written",
    "load_holds",
    "load_processed",
    "load_states",
    "write",
]


class StaleState(StorageUnavailable):
    """A compare-and-set update found a balance changed by another writer."""


#: What a batch writes besides the balances, as rows ready for ``executemany``.
Written = dict[str, list[dict[str, Any]]]

_update_budget = (
    update(budgets)
    .where(budgets.c.agent_id == bindparam("b_agent_id"))
    .where(budgets.c.ledger_seq == bindparam("b_old_seq"))
    .values(
        allocated_tokens=bindparam("b_allocated"),
        used_tokens=bindparam("b_used"),
        reserved_tokens=bindparam("b_reserved"),
        thresholds=bindparam("b_thresholds"),
        period=bindparam("b_period"),
        timezone=bindparam("b_timezone"),
        period_start=bindparam("b_period_start"),
        resets_at=bindparam("b_resets_at"),
        ledger_seq=bindparam("b_seq"),
        updated_at=bindparam("b_now"),
    )
)

#: Only an open hold closes: a second writer's close finds no row to change.
_close_hold = (
    update(reservations)
    .where(reservations.c.reservation_id == bindparam("h_id"))
    .where(reservations.c.status == HoldStatus.OPEN)
    .values(
        status=bindparam("h_status"),
        closed_at=bindparam("h_closed_at"),
        closed_by=bindparam("h_closed_by"),
        used_tokens=bindparam("h_used"),
    )
)


_move_agent = (
    update(agents)
    .where(agents.c.agent_id == bindparam("m_agent_id"))
    .values(group_id=bindparam("m_group_id"))
)

_ids: BindParameter[list[str]] = bindparam("ids", expanding=True)
_period_columns = (
    budgets.c.period,
    budgets.c.timezone,
    budgets.c.period_start,
    budgets.c.resets_at,
)
_select_agents = select(agents.c.agent_id, agents.c.group_id).where(agents.c.agent_id.in_(_ids))
_select_budgets = (
    select(
        budgets.c.agent_id,
        budgets.c.allocated_tokens,
        budgets.c.used_tokens,
        budgets.c.reserved_tokens,
        budgets.c.thresholds,
        budgets.c.ledger_seq,
        *_period_columns,
    )
    .where(budgets.c.agent_id.in_(_ids))
    .order_by(budgets.c.agent_id)
)
_select_budgets_locked = _select_budgets.with_for_update()
#: SQLite: the write lock is already held, so agents and budgets come in one
#: query (PostgreSQL cannot lock the nullable side of an outer join).
_select_agents_budgets = (
    select(
        agents.c.agent_id,
        agents.c.group_id,
        budgets.c.agent_id,
        budgets.c.allocated_tokens,
        budgets.c.used_tokens,
        budgets.c.reserved_tokens,
        budgets.c.thresholds,
        budgets.c.ledger_seq,
        *_period_columns,
    )
    .select_from(agents.outerjoin(budgets, budgets.c.agent_id == agents.c.agent_id))
    .where(agents.c.agent_id.in_(_ids))
)
_select_processed = select(
    processed_commands.c.message_id,
    processed_commands.c.fingerprint,
    processed_commands.c.reply,
).where(processed_commands.c.message_id.in_(_ids))
# Statements built once: SQLAlchemy then finds them in its compiled cache
# without generating a cache key from a fresh construct on every batch.
_inserts = {
    name: insert(table)
    for name, table in (
        ("agents", agents),
        ("budgets", budgets),
        ("reservations", reservations),
        ("ledger", ledger),
        ("processed", processed_commands),
        ("outbox", outbox),
    )
}


def _thresholds_text(value: tuple[int, ...] | None) -> str | None:
    return None if value is None else ",".join(map(str, value))


def _thresholds_of(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    return tuple(int(part) for part in text.split(",") if part)


def _utc(moment: datetime) -> datetime:
    # SQLite hands datetimes back naive; every one we store is UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def load_states(
    conn: AsyncConnection, agent_ids: list[str], *, lock_rows: bool
) -> dict[str, AgentState]:
    states = {agent_id: AgentState(agent_id) for agent_id in agent_ids}
    if lock_rows:
        registered = await conn.execute(_select_agents, {"ids": agent_ids})
        for agent_id, group_id in registered:
            states[agent_id].registered = True
            states[agent_id].group_id = group_id
        rows: list[tuple[Any, ...]] = [
            tuple(row) for row in await conn.execute(_select_budgets_locked, {"ids": agent_ids})
        ]
    else:
        rows = []
        for agent_id, group_id, budget_of, *balance in await conn.execute(
            _select_agents_budgets, {"ids": agent_ids}
        ):
            states[agent_id].registered = True
            states[agent_id].group_id = group_id
            if budget_of is not None:
                rows.append((agent_id, *balance))
    for agent_id, allocated, used, reserved, thresholds, seq, *period in rows:
        state = states[agent_id]
        state.has_budget = True
        state.allocated, state.used, state.reserved = allocated, used, reserved
        state.thresholds = _thresholds_of(thresholds)
        state.seq = state.stored_seq = seq
        kind, timezone, start, resets_at = period
        if kind is not None:
            state.period, state.timezone = Period(kind), timezone
            state.period_start, state.resets_at = _utc(start), _utc(resets_at)
    return states


async def load_holds(
    conn: AsyncConnection, states: dict[str, AgentState], referenced: set[str]
) -> None:
    """The open holds of the batch's agents and the holds its commands name, in
    one query; read after the budgets' lock, which every writer of a hold takes.

    ``reserved_tokens`` is the sum of an agent's open holds, so only agents
    with a positive one have any: a batch of plain consumes reads nothing here.
    """
    holding = [agent_id for agent_id, state in states.items() if state.reserved > 0]
    if not holding and not referenced:
        return
    wanted = or_(
        and_(reservations.c.agent_id.in_(holding), reservations.c.status == HoldStatus.OPEN),
        reservations.c.reservation_id.in_(referenced),
    )
    rows = await conn.execute(
        select(
            reservations.c.reservation_id,
            reservations.c.agent_id,
            reservations.c.tokens,
            reservations.c.expires_at,
            reservations.c.created_at,
            reservations.c.message_id,
            reservations.c.status,
        ).where(wanted)
    )
    for rid, agent_id, tokens, expires_at, created_at, message_id, status in rows:
        state = states.get(agent_id)
        if state is None:
            continue  # another agent's hold: not this batch's business
        state.holds[rid] = Hold(
            reservation_id=rid,
            agent_id=agent_id,
            tokens=tokens,
            expires_at=_utc(expires_at),
            created_at=_utc(created_at),
            message_id=message_id,
            status=status,
            stored_status=status,
        )


async def load_processed(
    conn: AsyncConnection, message_ids: list[str]
) -> dict[str, tuple[str, bytes]]:
    """message_id -> (fingerprint, stored reply) of the ids already recorded."""
    if not message_ids:
        return {}
    rows = await conn.execute(_select_processed, {"ids": list(set(message_ids))})
    return {mid: (fp, reply.encode()) for mid, fp, reply in rows}


async def write(
    conn: AsyncConnection, states: Iterable[AgentState], rows: Written, now: datetime
) -> None:
    """Write what changed: agents, budgets (compare-and-set), holds, and
    ``rows`` (ledger, processed commands, outbox)."""
    new_agents = []
    moved: list[dict[str, Any]] = []
    new_budgets: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    new_holds: list[dict[str, Any]] = []
    closed_holds: list[dict[str, Any]] = []
    for state in states:
        if state.new_agent:
            new_agents.append(
                {"agent_id": state.agent_id, "created_at": now, "group_id": state.group_id}
            )
        elif state.group_changed:
            moved.append({"m_agent_id": state.agent_id, "m_group_id": state.group_id})
        for hold in state.holds.values():
            if hold.stored_status is None:
                new_holds.append(_hold_row(hold))
            elif hold.status != hold.stored_status:
                closed_holds.append(
                    {
                        "h_id": hold.reservation_id,
                        "h_status": hold.status,
                        "h_closed_at": hold.closed_at,
                        "h_closed_by": hold.closed_by,
                        "h_used": hold.used_tokens,
                    }
                )
        if not state.dirty:
            continue
        if state.stored_seq is None:
            new_budgets.append(
                {
                    "agent_id": state.agent_id,
                    "allocated_tokens": state.allocated,
                    "used_tokens": state.used,
                    "reserved_tokens": state.reserved,
                    "thresholds": _thresholds_text(state.thresholds),
                    "ledger_seq": state.seq,
                    "updated_at": now,
                    "period": state.period,
                    "timezone": state.timezone,
                    "period_start": state.period_start,
                    "resets_at": state.resets_at,
                }
            )
        else:
            changed.append(
                {
                    "b_agent_id": state.agent_id,
                    "b_old_seq": state.stored_seq,
                    "b_allocated": state.allocated,
                    "b_used": state.used,
                    "b_reserved": state.reserved,
                    "b_thresholds": _thresholds_text(state.thresholds),
                    "b_period": state.period,
                    "b_timezone": state.timezone,
                    "b_period_start": state.period_start,
                    "b_resets_at": state.resets_at,
                    "b_seq": state.seq,
                    "b_now": now,
                }
            )
    if new_agents:
        await conn.execute(_inserts["agents"], new_agents)
    if moved:
        await conn.execute(_move_agent, moved)
    if new_budgets:
        await conn.execute(_inserts["budgets"], new_budgets)
    if changed:
        result = await conn.execute(_update_budget, changed)
        if result.rowcount not in (-1, len(changed)):
            raise StaleState(f"{len(changed) - result.rowcount} balances changed underneath")
    if new_holds:
        await conn.execute(_inserts["reservations"], new_holds)
    if closed_holds:
        result = await conn.execute(_close_hold, closed_holds)
        if result.rowcount not in (-1, len(closed_holds)):
            raise StaleState(f"{len(closed_holds) - result.rowcount} holds closed underneath")
    for name in ("ledger", "processed", "outbox"):
        if rows.get(name):
            await conn.execute(_inserts[name], rows[name])


def _hold_row(hold: Hold) -> dict[str, Any]:
    return {
        "reservation_id": hold.reservation_id,
        "agent_id": hold.agent_id,
        "tokens": hold.tokens,
        "status": hold.status,
        "expires_at": hold.expires_at,
        "created_at": hold.created_at,
        "message_id": hold.message_id,
        "closed_at": hold.closed_at,
        "closed_by": hold.closed_by,
        "used_tokens": hold.used_tokens,
    }
