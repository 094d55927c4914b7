"""BudgetService: applies batches of commands in one transaction each.

A batch is read, decided and written with a handful of statements whatever
its size: the balances of its agents are loaded under a lock (SQLite's write
lock, PostgreSQL's row locks), the rules run in memory in delivery order, and
the changes, ledger rows and processed-command records are written back with
``executemany``. Nothing is trusted across batches.
"""

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, exc, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from schemas import (
    Command,
    ErrorBody,
    ErrorCode,
    ErrorReply,
    encode_reply,
    parse_reply,
)

from .db import is_transient
from .errors import BudgetError, Conflict
from .outcomes import Envelope, Fence, Fenced, Outcome, OutcomeKind, StorageUnavailable
from .rules import AgentState, apply_rule
from .tables import agents, budgets, ledger, partition_leases, processed_commands

__all__ = ["BudgetService", "StaleState", "fingerprint"]


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


def _now() -> datetime:
    return datetime.now(UTC)


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


class BudgetService:
    """The rules of budgets and the SQL that keeps them; knows nothing of AMQP."""

    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], datetime] = _now) -> None:
        self._engine = engine
        self._clock = clock
        self._lock_rows = engine.dialect.name == "postgresql"

    async def apply(self, batch: Sequence[Envelope], fence: Fence | None = None) -> list[Outcome]:
        """Apply ``batch`` in order and commit; one outcome per envelope.

        With a ``fence``, the transaction first checks (and locks) the lease:
        if the partition has passed to another owner it raises ``Fenced`` and
        commits nothing.

        Transient database errors (outage, lock timeout) propagate so that the
        caller can retry the same batch later. Any other database error is
        isolated by splitting the batch: the commands around the culprit are
        applied, the culprit alone gets a ``rejected`` outcome.
        """
        if not batch:
            return []
        try:
            return await self._apply_isolating(batch, fence)
        except exc.SQLAlchemyError as error:
            if is_transient(error):
                raise StorageUnavailable(_reason(error)) from error
            raise
        except (OSError, TimeoutError) as error:
            raise StorageUnavailable(str(error)) from error

    async def _apply_isolating(
        self, batch: Sequence[Envelope], fence: Fence | None
    ) -> list[Outcome]:
        try:
            return await self._apply_once(batch, fence)
        except exc.SQLAlchemyError as error:
            if is_transient(error):
                raise
            if len(batch) > 1:
                middle = len(batch) // 2
                head = await self._apply_isolating(batch[:middle], fence)
                return head + await self._apply_isolating(batch[middle:], fence)
        # One command alone failed: try once more, since a race with another
        # writer (the same message_id on two lanes) clears on a second look.
        try:
            return await self._apply_once(batch, fence)
        except exc.SQLAlchemyError as error:
            if is_transient(error):
                raise
            return [_rejected(error)]

    async def _apply_once(self, batch: Sequence[Envelope], fence: Fence | None) -> list[Outcome]:
        async with self._engine.begin() as conn:
            if fence is not None:
                await _check_fence(conn, fence)
            return await self._apply_in(conn, batch, fence)

    async def _apply_in(
        self, conn: AsyncConnection, batch: Sequence[Envelope], fence: Fence | None
    ) -> list[Outcome]:
        now = self._clock()
        signature = {
            "worker_id": fence.owner if fence else None,
            "lease_partition": fence.partition if fence else None,
            "lease_epoch": fence.epoch if fence else None,
        }
        agent_ids = sorted({envelope.command.agent_id for envelope in batch})
        states = await self._load_states(conn, agent_ids)
        seen = await self._load_processed(
            conn,
            [e.message_id for e in batch if e.message_id is not None and e.command.changes_state],
        )
        outcomes: list[Outcome] = []
        processed_rows: list[dict[str, Any]] = []
        ledger_rows: list[dict[str, Any]] = []
        for envelope in batch:
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
                            **signature,
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
        await self._write(conn, states.values(), ledger_rows, processed_rows, now)
        return outcomes

    async def _load_states(
        self, conn: AsyncConnection, agent_ids: list[str]
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
        if self._lock_rows:
            query = query.with_for_update()
        for agent_id, allocated, used, seq in await conn.execute(query):
            state = states[agent_id]
            state.has_budget = True
            state.allocated, state.used = allocated, used
            state.seq = state.stored_seq = seq
        return states

    async def _load_processed(
        self, conn: AsyncConnection, message_ids: list[str]
    ) -> dict[str, _Prior]:
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
        self,
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


async def _check_fence(conn: AsyncConnection, fence: Fence) -> None:
    # An UPDATE, not a SELECT: it takes the lease row's lock (PostgreSQL) so a
    # takeover waits for this commit, and SQLite's write lock is already ours.
    held = await conn.execute(
        update(partition_leases)
        .where(partition_leases.c.partition == fence.partition)
        .where(partition_leases.c.owner == fence.owner)
        .where(partition_leases.c.epoch == fence.epoch)
        .values(epoch=partition_leases.c.epoch)
    )
    if held.rowcount != 1:
        raise Fenced(f"partition {fence.partition} is no longer held under epoch {fence.epoch}")


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


def _reason(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return (text.splitlines() or [type(error).__name__])[0][:500]


def _rejected(error: exc.SQLAlchemyError) -> Outcome:
    reason = _reason(error)
    error_reply = ErrorReply(
        error=ErrorBody(
            code=ErrorCode.DATABASE_REJECTED, message=f"the database refused the command: {reason}"
        )
    )
    return Outcome(OutcomeKind.REJECTED, error_reply, encode_reply(error_reply))
