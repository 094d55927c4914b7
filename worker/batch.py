"""One transaction's work: load a batch's agents, run the rules, write the results.

Everything here runs inside a transaction the caller opened; nothing commits.
"""

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from schemas import Command, ErrorReply, encode_reply, parse_reply

from .errors import BudgetError, Conflict
from .outcomes import Envelope, Fence, Outcome, OutcomeKind, StorageUnavailable
from .rules import AgentState, apply_rule
from .tables import agents, budgets, ledger, partition_leases, processed_commands

__all__ = ["StaleState", "apply_in_transaction", "fence_holds", "fingerprint"]


class StaleState(StorageUnavailable):
    """A compare-and-set update found a balance changed by another writer."""


@dataclass(frozen=True, slots=True)
class _Prior:
    fingerprint: str
    body: bytes


def fingerprint(command: Command) -> str:
    """Identity of a command's content, independent of key order and spacing."""
    canonical = json.dumps(command.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


_update_budget = (
    update(budgets)
    .where(budgets.c.agent_id == bindparam("b_agent_id"))
    .where(budgets.c.ledger_seq == bindparam("b_old_seq"))
    .values(
        allocated_tokens=bindparam("b_allocated"),
        used_tokens=bindparam("b_used"),
        ledger_seq=bindparam("b_seq"),
        updated_at=bindparam("b_now"),
    )
)


async def apply_in_transaction(
    conn: AsyncConnection,
    items: Sequence[tuple[Envelope, Fence | None]],
    *,
    now: datetime,
    lock_rows: bool,
) -> list[Outcome]:
    """Apply ``items`` in order inside the caller's transaction; write the results.

    The balances of the agents involved are read once (under a lock), the
    rules run in memory in delivery order, and what changed is written back
    with one ``executemany`` per table.
    """
    agent_ids = sorted({envelope.command.agent_id for envelope, _ in items})
    states = await _load_states(conn, agent_ids, lock_rows=lock_rows)
    seen = await _load_processed(
        conn,
        [e.message_id for e, _ in items if e.message_id is not None and e.command.changes_state],
    )
    outcomes: list[Outcome] = []
    processed_rows: list[dict[str, Any]] = []
    ledger_rows: list[dict[str, Any]] = []
    for envelope, fence in items:
        command = envelope.command
        state = states[command.agent_id]
        if not command.changes_state:
            outcomes.append(_query(state, command))
            continue
        message_id = envelope.message_id
        if message_id is None:  # the lane refuses these before they get here
            raise ValueError("a state-changing command needs a message_id")
        print_ = fingerprint(command)
        prior = seen.get(message_id)
        if prior is not None:
            outcomes.append(_replay(prior, print_, message_id))
            continue
        try:
            reply, change = apply_rule(state, command)
        except BudgetError as refusal:
            error_reply = ErrorReply(error=refusal.to_body())
            body = encode_reply(error_reply)
            outcomes.append(Outcome(OutcomeKind.REFUSED, error_reply, body))
        else:
            body = encode_reply(reply)
            outcomes.append(Outcome(OutcomeKind.APPLIED, reply, body))
            if change is not None:
                ledger_rows.append(
                    {
                        "agent_id": command.agent_id,
                        "seq": change.seq,
                        "message_id": message_id,
                        "kind": change.kind,
                        "amount": change.amount,
                        "allocated_after": change.allocated_after,
                        "used_after": change.used_after,
                        "created_at": now,
                        "worker_id": fence.owner if fence else None,
                        "lease_partition": fence.partition if fence else None,
                        "lease_epoch": fence.epoch if fence else None,
                    }
                )
        seen[message_id] = _Prior(print_, body)
        processed_rows.append(
            {
                "message_id": message_id,
                "agent_id": command.agent_id,
                "command_type": command.command_type.value,
                "fingerprint": print_,
                "reply": body.decode(),
                "created_at": now,
            }
        )
    await _write(conn, states.values(), ledger_rows, processed_rows, now)
    return outcomes


async def _load_states(
    conn: AsyncConnection, agent_ids: list[str], *, lock_rows: bool
) -> dict[str, AgentState]:
    states = {agent_id: AgentState(agent_id) for agent_id in agent_ids}
    registered = await conn.execute(
        select(agents.c.agent_id).where(agents.c.agent_id.in_(agent_ids))
    )
    for (agent_id,) in registered:
        states[agent_id].registered = True
    query = (
        select(
            budgets.c.agent_id,
            budgets.c.allocated_tokens,
            budgets.c.used_tokens,
            budgets.c.ledger_seq,
        )
        .where(budgets.c.agent_id.in_(agent_ids))
        .order_by(budgets.c.agent_id)
    )
    if lock_rows:
        query = query.with_for_update()
    for agent_id, allocated, used, seq in await conn.execute(query):
        state = states[agent_id]
        state.has_budget = True
        state.allocated, state.used = allocated, used
        state.seq = state.stored_seq = seq
    return states


async def _load_processed(conn: AsyncConnection, message_ids: list[str]) -> dict[str, _Prior]:
    if not message_ids:
        return {}
    rows = await conn.execute(
        select(
            processed_commands.c.message_id,
            processed_commands.c.fingerprint,
            processed_commands.c.reply,
        ).where(processed_commands.c.message_id.in_(set(message_ids)))
    )
    return {mid: _Prior(fp, reply.encode()) for mid, fp, reply in rows}


async def _write(
    conn: AsyncConnection,
    states: Any,
    ledger_rows: list[dict[str, Any]],
    processed_rows: list[dict[str, Any]],
    now: datetime,
) -> None:
    new_agents = [{"agent_id": s.agent_id, "created_at": now} for s in states if s.new_agent]
    new_budgets: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    for state in states:
        if not state.dirty:
            continue
        if state.stored_seq is None:
            new_budgets.append(
                {
                    "agent_id": state.agent_id,
                    "allocated_tokens": state.allocated,
                    "used_tokens": state.used,
                    "ledger_seq": state.seq,
                    "updated_at": now,
                }
            )
        else:
            changed.append(
                {
                    "b_agent_id": state.agent_id,
                    "b_old_seq": state.stored_seq,
                    "b_allocated": state.allocated,
                    "b_used": state.used,
                    "b_seq": state.seq,
                    "b_now": now,
                }
            )
    if new_agents:
        await conn.execute(insert(agents), new_agents)
    if new_budgets:
        await conn.execute(insert(budgets), new_budgets)
    if changed:
        result = await conn.execute(_update_budget, changed)
        if result.rowcount not in (-1, len(changed)):
            raise StaleState(f"{len(changed) - result.rowcount} balances changed underneath")
    if ledger_rows:
        await conn.execute(insert(ledger), ledger_rows)
    if processed_rows:
        await conn.execute(insert(processed_commands), processed_rows)


async def fence_holds(conn: AsyncConnection, fence: Fence) -> bool:
    # An UPDATE, not a SELECT: it takes the lease row's lock (PostgreSQL) so a
    # takeover waits for this commit, and SQLite's write lock is already ours.
    held = await conn.execute(
        update(partition_leases)
        .where(partition_leases.c.partition == fence.partition)
        .where(partition_leases.c.owner == fence.owner)
        .where(partition_leases.c.epoch == fence.epoch)
        .values(epoch=partition_leases.c.epoch)
    )
    return bool(held.rowcount == 1)


def _query(state: AgentState, command: Command) -> Outcome:
    try:
        reply, _ = apply_rule(state, command)
    except BudgetError as refusal:
        error_reply = ErrorReply(error=refusal.to_body())
        return Outcome(OutcomeKind.QUERY_REFUSED, error_reply, encode_reply(error_reply))
    return Outcome(OutcomeKind.QUERY, reply, encode_reply(reply))


def _replay(prior: _Prior, print_: str, message_id: str) -> Outcome:
    if prior.fingerprint == print_:
        return Outcome(OutcomeKind.DUPLICATE, parse_reply(prior.body), prior.body)
    error_reply = ErrorReply(error=Conflict(message_id).to_body())
    return Outcome(OutcomeKind.CONFLICT, error_reply, encode_reply(error_reply))
