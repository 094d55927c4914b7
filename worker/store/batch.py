"""One transaction's work: load a batch's agents, run the rules, write the results.

Everything here runs inside a transaction the caller opened; nothing commits.
The SQL is in ``batch_store``: a handful of reads for the whole batch, then
one ``executemany`` per table.
"""

import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import bindparam, update
from sqlalchemy.ext.asyncio import AsyncConnection

from token_budget.schemas import (
    DEFAULT_RESERVATION_TTL_SECONDS,
    Command,
    CommandType,
    Commit,
    Consistency,
    ErrorReply,
    OkReply,
    RegisterAgent,
    Release,
    SetGroup,
    ThresholdCrossedEvent,
    encode_reply,
    parse_reply,
    threshold_routing_key,
)
from token_budget.worker.domain.errors import BudgetError, Conflict
from token_budget.worker.domain.groups import (
    GroupState,
    apply_agent,
    apply_group,
    roll_group,
    spread,
)
from token_budget.worker.domain.outcomes import Envelope, Fence, Outcome, OutcomeKind
from token_budget.worker.domain.periods import roll
from token_budget.worker.domain.reservations import expire_due
from token_budget.worker.domain.state import AgentState, Crossing, RuleContext
from token_budget.worker.store.batch_store import (
    StaleState,
    Written,
    load_holds,
    load_processed,
    load_states,
    write,
)
from token_budget.worker.store.group_store import load_groups, write_groups
from token_budget.worker.store.tables import partition_leases

__all__ = [
    "Applied",
    "StaleState",
    "apply_in_transaction",
    "event_id_for",
    "fence_holds",
    "fingerprint",
]

#: Event ids are UUIDv5 of (agent, ledger seq, threshold) in this namespace:
#: one crossing, one id, however often it is published.
_EVENTS = uuid.UUID("6a0f7f0e-3c55-4f57-9d2e-2f4b8f1f8d11")


@dataclass(frozen=True, slots=True)
class Applied:
    """What a transaction did: one outcome per item, and the events it recorded."""

    outcomes: list[Outcome]
    events: int = 0
    #: Agents whose state this transaction writes.
    written: frozenset[str] = frozenset()


def fingerprint(command: Command) -> str:
    """Identity of a command's content, independent of key order and spacing.

    The validated model serializes its fields in its own declared order, so
    two bodies that parse to the same command give the same bytes.
    """
    # Ids added by later contracts are left out when absent, so that a command
    # recorded before them keeps its fingerprint (and a retry is a duplicate).
    absent = {f for f in ("agent_id", "group_id") if getattr(command, f, "") is None}
    return hashlib.sha256(command.model_dump_json(exclude=absent).encode()).hexdigest()


def event_id_for(agent_id: str, seq: int, threshold: int) -> str:
    return str(uuid.uuid5(_EVENTS, f"{agent_id}\x00{seq}\x00{threshold}"))


async def apply_in_transaction(
    conn: AsyncConnection,
    items: Sequence[tuple[Envelope, Fence | None]],
    *,
    now: datetime,
    lock_rows: bool,
    default_ttl: int = DEFAULT_RESERVATION_TTL_SECONDS,
) -> Applied:
    """Apply ``items`` in order inside the caller's transaction; write the results.

    The balances and holds of the agents involved are read once (under a
    lock), the rules run in memory in delivery order, and what changed is
    written back with one ``executemany`` per table. Before each command, the
    agent's holds whose deadline is ``now`` or earlier expire: expiry takes
    its place in the agent's own order of commands, and so does the reset
    of a period that has ended (``periods.roll``).
    """
    # Every id is looked up as an agent: a group command must know that its
    # id is no agent's (one namespace), and an agent command that it is one.
    states = await load_states(conn, sorted({e.command.key for e, _ in items}), lock_rows=lock_rows)
    referenced = {
        e.command.reservation_id for e, _ in items if isinstance(e.command, Commit | Release)
    }
    await load_holds(conn, states, referenced)
    seen = await load_processed(
        conn,
        [e.message_id for e, _ in items if e.message_id is not None and e.command.changes_state],
    )
    groups = await load_groups(conn, _groups_wanted(items, states), lock_rows=lock_rows)
    outcomes: list[Outcome] = []
    rows: Written = {"ledger": [], "processed": [], "outbox": [], "group_ledger": []}
    for envelope, fence in items:
        command = envelope.command
        ctx = RuleContext(now, envelope.message_id, default_ttl)
        if command.for_group:
            group = groups.setdefault(command.key, GroupState(command.key))
            roll_group(group, now)
            parent = groups.get(getattr(command, "parent_id", None) or "")
            run = partial(
                apply_group,
                group,
                command,
                ctx,
                parent=parent,
                is_agent=states[command.key].registered,
            )
            outcomes.append(_outcome(envelope, ctx, seen, rows["processed"], run))
            continue
        state = states[command.key]
        chain = [groups[g] for g in groups[state.group_id].chain] if state.group_id else []
        marks = len(state.changes), len(state.crossings)
        # Rows are the group's the agent was in when they happened: a set_group
        # moves only what comes after it (its own expiries before it included).
        member_of = state.group_id
        for group in chain:
            roll_group(group, now)
        expire_due(state, now)
        spread(chain, state.changes[marks[0] :], state.agent_id, "")
        roll(state, now)
        named = getattr(command, "group_id", None)
        target = (
            groups.get(named) if named and isinstance(command, RegisterAgent | SetGroup) else None
        )
        run_agent = partial(
            _reply_of,
            apply_agent,
            state,
            command,
            ctx,
            chain,
            target=target,
            is_group=command.key in groups and groups[command.key].registered,
        )
        outcomes.append(_outcome(envelope, ctx, seen, rows["processed"], run_agent))
        _collect(state, envelope, fence, marks, now, rows, member_of)
    for group in groups.values():
        _collect_group(group, fence_of(items), now, rows)
    await write(conn, states.values(), rows, now)
    await write_groups(conn, groups.values(), rows["group_ledger"], now)
    written = frozenset(
        {a for a, s in states.items() if s.dirty or s.new_agent or s.group_changed}
        | {g for g, group in groups.items() if group.changed}
    )
    return Applied(outcomes, len(rows["outbox"]), written)


def _reply_of(rule: Callable[..., tuple[OkReply, Any]], *args: Any, **kwargs: Any) -> OkReply:
    return rule(*args, **kwargs)[0]


def _groups_wanted(
    items: Sequence[tuple[Envelope, Fence | None]], states: dict[str, AgentState]
) -> set[str]:
    """Groups a batch may touch: its agents' chains, the groups it names, and
    its agent ids (to refuse an agent whose id is a group's)."""
    wanted = {s.group_id for s in states.values() if s.group_id is not None}
    for envelope, _ in items:
        command = envelope.command
        if command.for_group:
            wanted.add(command.key)
            parent = getattr(command, "parent_id", None)
            if parent is not None:
                wanted.add(parent)
        elif isinstance(command, RegisterAgent | SetGroup):
            wanted.add(command.agent_id)
            if command.group_id is not None:
                wanted.add(command.group_id)
    return wanted


def fence_of(items: Sequence[tuple[Envelope, Fence | None]]) -> Fence | None:
    """Any fence of the transaction: a group's events go with that partition."""
    return next((fence for _, fence in items if fence is not None), None)


def _outcome(
    envelope: Envelope,
    ctx: RuleContext,
    seen: dict[str, tuple[str, bytes]],
    processed: list[dict[str, Any]],
    run: Callable[[], OkReply],
) -> Outcome:
    if envelope.command.changes_state:
        return _change(envelope, ctx, seen, processed, run)
    return _query(envelope.command, ctx, run)


def _change(
    envelope: Envelope,
    ctx: RuleContext,
    seen: dict[str, tuple[str, bytes]],
    processed: list[dict[str, Any]],
    run: Callable[[], OkReply],
) -> Outcome:
    command, message_id = envelope.command, envelope.message_id
    if message_id is None:  # the lane refuses these before they get here
        raise ValueError("a state-changing command needs a message_id")
    print_ = fingerprint(command)
    prior = seen.get(message_id)
    if prior is not None:
        return _replay(prior, print_, message_id)
    try:
        reply = run()
    except BudgetError as refusal:
        error_reply = ErrorReply(error=refusal.to_body())
        outcome = Outcome(OutcomeKind.REFUSED, error_reply, encode_reply(error_reply))
    else:
        outcome = Outcome(OutcomeKind.APPLIED, reply, encode_reply(reply))
    seen[message_id] = (print_, outcome.body)
    processed.append(
        {
            "message_id": message_id,
            "agent_id": command.key,
            "command_type": command.command_type.value,
            "fingerprint": print_,
            "reply": outcome.body.decode(),
            "created_at": ctx.now,
        }
    )
    return outcome


def _collect(
    state: AgentState,
    envelope: Envelope,
    fence: Fence | None,
    marks: tuple[int, int],
    now: datetime,
    rows: Written,
    group_id: str | None,
) -> None:
    """The ledger and outbox rows of what this command (and expiry before it)
    changed, each under ``group_id``: the agent's group before the command."""
    lease = {
        "worker_id": fence.owner if fence else None,
        "lease_partition": fence.partition if fence else None,
        "lease_epoch": fence.epoch if fence else None,
    }
    for change in state.changes[marks[0] :]:
        rows["ledger"].append(
            {
                "agent_id": state.agent_id,
                "seq": change.seq,
                "message_id": change.message_id or envelope.message_id,
                "kind": change.kind,
                "amount": change.amount,
                "allocated_after": change.allocated_after,
                "used_after": change.used_after,
                "reserved_after": change.reserved_after,
                "reservation_id": change.reservation_id,
                "period_start": change.period_start,
                "group_id": group_id,
                "created_at": now,
                **lease,
            }
        )
    for crossing in state.crossings[marks[1] :]:
        rows["outbox"].append(
            _event_row(state.agent_id, crossing, envelope.message_id or "", fence, now)
        )


def _collect_group(group: GroupState, fence: Fence | None, now: datetime, rows: Written) -> None:
    """The group's own ledger rows and its threshold events, once per transaction."""
    rows["group_ledger"].extend(
        {
            "group_id": group.group_id,
            "seq": change.seq,
            "kind": change.kind,
            "amount": change.amount,
            "allocated_after": change.allocated_after,
            "used_after": change.used_after,
            "reserved_after": change.reserved_after,
            "message_id": change.message_id or "",
            "period_start": change.period_start,
            "created_at": now,
        }
        for change in group.changes
    )
    for crossing in group.crossings:
        event = ThresholdCrossedEvent(
            event_id=str(
                uuid.uuid5(
                    _EVENTS,
                    f"{group.group_id}\x00{crossing.agent_id}\x00{crossing.agent_seq}"
                    f"\x00{crossing.threshold}",
                )
            ),
            agent_id=crossing.agent_id,
            group_id=group.group_id,
            threshold=crossing.threshold,
            allocated_tokens=crossing.allocated,
            used_tokens=crossing.used,
            reserved_tokens=crossing.reserved,
            command_type=CommandType(crossing.command_type),
            message_id=crossing.message_id,
            ledger_seq=crossing.agent_seq,
            occurred_at=now,
        )
        rows["outbox"].append(_outbox_row(event, group.group_id, fence, now))


def _outbox_row(
    event: ThresholdCrossedEvent, owner: str, fence: Fence | None, now: datetime
) -> dict[str, Any]:
    absent = {"group_id"} if event.group_id is None else set()
    return {
        "event_id": event.event_id,
        "partition": fence.partition if fence else None,
        "agent_id": owner,
        "routing_key": threshold_routing_key(event.threshold),
        "event_type": event.event,
        "body": event.model_dump_json(exclude=absent),
        "created_at": now,
        "published_at": None,
    }


def _event_row(
    agent_id: str, crossing: Crossing, message_id: str, fence: Fence | None, now: datetime
) -> dict[str, Any]:
    event = ThresholdCrossedEvent(
        event_id=event_id_for(agent_id, crossing.seq, crossing.threshold),
        agent_id=agent_id,
        threshold=crossing.threshold,
        allocated_tokens=crossing.allocated,
        used_tokens=crossing.used,
        reserved_tokens=crossing.reserved,
        command_type=CommandType(crossing.command_type),
        message_id=message_id,
        ledger_seq=crossing.seq,
        occurred_at=now,
    )
    return _outbox_row(event, agent_id, fence, now)


async def fence_holds(conn: AsyncConnection, fence: Fence) -> bool:
    # An UPDATE, not a SELECT: it takes the lease row's lock (PostgreSQL) so a
    # takeover waits for this commit, and SQLite's write lock is already ours.
    held = await conn.execute(
        _check_lease,
        {"l_partition": fence.partition, "l_owner": fence.owner, "l_epoch": fence.epoch},
    )
    return bool(held.rowcount == 1)


_check_lease = (
    update(partition_leases)
    .where(partition_leases.c.partition == bindparam("l_partition"))
    .where(partition_leases.c.owner == bindparam("l_owner"))
    .where(partition_leases.c.epoch == bindparam("l_epoch"))
    .values(epoch=partition_leases.c.epoch)
)


def _query(command: Command, ctx: RuleContext, run: Callable[[], OkReply]) -> Outcome:
    try:
        reply = run()
    except BudgetError as refusal:
        error_reply = ErrorReply(error=refusal.to_body())
        return Outcome(OutcomeKind.QUERY_REFUSED, error_reply, encode_reply(error_reply))
    if getattr(command, "consistency", None) is not None:
        # It named its consistency: say which it got. On its lane that is
        # read-your-writes, even if it asked for committed (which is less).
        reply = reply.model_copy(
            update={"consistency": Consistency.READ_YOUR_WRITES, "as_of": ctx.now}
        )
    return Outcome(OutcomeKind.QUERY, reply, encode_reply(reply))


def _replay(prior: tuple[str, bytes], print_: str, message_id: str) -> Outcome:
    print_before, body = prior
    if print_before == print_:
        return Outcome(OutcomeKind.DUPLICATE, parse_reply(body), body)
    error_reply = ErrorReply(error=Conflict(message_id).to_body())
    return Outcome(OutcomeKind.CONFLICT, error_reply, encode_reply(error_reply))
