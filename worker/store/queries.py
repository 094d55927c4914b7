"""Queries answered from the last committed state, beside the lanes.

A query on its agent's lane waits behind that lane's backlog: it sees every
command published before it (read-your-writes). A ``committed`` query on
``budget.queries`` reads the budgets as the last commit left them, without
waiting: one read-only transaction per batch of queries, no lease, no lock.
"""

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncEngine

from token_budget.schemas import Consistency, ErrorReply, encode_reply
from token_budget.worker.domain.errors import BudgetError
from token_budget.worker.domain.groups import GroupState, apply_group, roll_group
from token_budget.worker.domain.outcomes import Envelope, Fence, Outcome, OutcomeKind
from token_budget.worker.domain.periods import roll
from token_budget.worker.domain.rules import apply_rule
from token_budget.worker.domain.state import RuleContext
from token_budget.worker.errors import StorageUnavailable
from token_budget.worker.store.batch_store import load_states
from token_budget.worker.store.db import is_transient
from token_budget.worker.store.group_store import load_groups

__all__ = ["CommittedReader"]


def _now() -> datetime:
    return datetime.now(UTC)


class CommittedReader:
    """A ``CommandApplier`` for ``get_budget``/``get_available`` (of an agent or
    a group) that only reads.

    Promises: never writes, never waits for a lane; each reply carries
    ``consistency: "committed"`` and ``as_of``, the moment just before the
    read, so it reflects every commit made before then (and perhaps later
    ones). A hold past its deadline still counts until its lane expires it;
    a period that has ended shows as reset (its lane writes the reset with
    the agent's next command: the clock, not a command, decides it).
    """

    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], datetime] = _now) -> None:
        self._engine = engine
        self._clock = clock

    async def apply(self, batch: Sequence[Envelope], fence: Fence | None = None) -> list[Outcome]:
        if not batch:
            return []
        agent_ids = sorted({e.command.key for e in batch if not e.command.for_group})
        group_ids = {e.command.key for e in batch if e.command.for_group}
        as_of = self._clock()
        try:
            async with self._engine.connect() as conn:
                states = await load_states(conn, agent_ids, lock_rows=False)
                groups = await load_groups(conn, group_ids, lock_rows=False)
                await conn.rollback()
        except exc.SQLAlchemyError as error:
            if is_transient(error):
                raise StorageUnavailable(str(error).splitlines()[0][:300]) from error
            raise
        except OSError as error:
            raise StorageUnavailable(str(error)) from error
        outcomes = []
        for envelope in batch:
            command, ctx = envelope.command, RuleContext(now=as_of)
            try:
                if command.for_group:
                    group = groups.get(command.key) or GroupState(command.key)
                    roll_group(group, as_of)
                    reply = apply_group(group, command, ctx)
                else:
                    state = states[command.key]
                    roll(state, as_of)
                    reply, _ = apply_rule(state, command, ctx)
            except BudgetError as refusal:
                error_reply = ErrorReply(error=refusal.to_body())
                outcomes.append(
                    Outcome(OutcomeKind.QUERY_REFUSED, error_reply, encode_reply(error_reply))
                )
                continue
            reply = reply.model_copy(update={"consistency": Consistency.COMMITTED, "as_of": as_of})
            outcomes.append(Outcome(OutcomeKind.QUERY, reply, encode_reply(reply)))
        return outcomes
