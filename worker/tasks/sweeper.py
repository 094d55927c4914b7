"""The sweeper: ask the lanes to expire holds nobody came back for.

A hold expires lazily, before the agent's next command. An agent that sends
nothing more would keep its hold (and the budget's ``reserved_tokens``) past
the deadline, so each worker periodically reads the overdue holds from the
database (an index on open holds' deadlines) and publishes one internal
``expire_reservations`` command per agent to ``budget.commands``, routed by
the agent like any command. It lands on the agent's lane, behind the agent's
earlier commands, and the lane applies the expiry there: in order, as a
ledger entry. Duplicates (several workers, a lane that is behind) are
harmless: an expiry finds nothing left to expire.
"""

import asyncio
import contextlib
import random
import time
import uuid
from typing import Protocol

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractExchange, DeliveryMode
from structlog.typing import FilteringBoundLogger

from token_budget.client.connection import is_open
from token_budget.schemas import COMMANDS_EXCHANGE, CONTENT_TYPE, ExpireReservations
from token_budget.worker.backoff import RetryPolicy, pause
from token_budget.worker.metrics import SWEEPS, SWEPT_AGENTS

__all__ = ["OverdueStore", "Sweeper"]


class OverdueStore(Protocol):
    """What the sweeper needs of the database (``BudgetService`` has it)."""

    async def overdue_agents(self, *, limit: int = ...) -> list[str]: ...


class Sweeper:
    """Asks each overdue agent's lane to expire its holds; harmless when repeated."""

    def __init__(
        self,
        store: OverdueStore,
        connection: AbstractConnection,
        *,
        interval: float,
        user_id: str | None,
        retry: RetryPolicy,
        log: FilteringBoundLogger,
        limit: int = 1000,
    ) -> None:
        self._store = store
        self._connection = connection
        self._interval = interval
        #: Sent as ``user_id`` (the broker checks it is ours), so that an
        #: authorizing worker can tell the sweeper from an agent.
        self._user_id = user_id
        self._log = log.bind(task="sweeper")
        self._limit = limit
        self._retry = retry
        #: agent -> when we last asked; a lane that is behind is not asked again
        #: at every sweep, only after ``resend_after`` seconds.
        self._asked: dict[str, float] = {}
        self.resend_after = max(30.0, 6 * interval)
        #: Expiry requests published since start (for logs and tests).
        self.requested = 0

    async def run(self) -> None:
        backoff = self._retry.backoff()
        while is_open(self._connection):
            try:
                channel = await self._connection.channel(publisher_confirms=True)
                try:
                    exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
                    backoff.reset()
                    while True:
                        await self.sweep(exchange)
                        # Jittered, so that workers started together spread out.
                        await asyncio.sleep(self._interval * random.uniform(0.75, 1.25))
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not is_open(self._connection):
                    return
                delay = backoff.next()
                self._log.warning("sweep_failed", error=repr(error)[:300], retry_in_s=delay)
                await pause(delay)

    async def sweep(self, exchange: AbstractExchange) -> int:
        """Ask for the expiry of every overdue agent not asked recently; how many asked."""
        now = time.monotonic()
        self._asked = {a: t for a, t in self._asked.items() if now - t < self.resend_after}
        overdue = await self._store.overdue_agents(limit=self._limit)
        due = [agent for agent in overdue if agent not in self._asked]
        SWEEPS.inc()
        if not due:
            return 0
        await asyncio.gather(*(exchange.publish(self._message(a), a) for a in due))
        self._asked.update(dict.fromkeys(due, now))
        self.requested += len(due)
        SWEPT_AGENTS.inc(len(due))
        self._log.info("expiry_requested", agents=len(due))
        return len(due)

    def _message(self, agent_id: str) -> aio_pika.Message:
        command = ExpireReservations(type="expire_reservations", agent_id=agent_id)
        return aio_pika.Message(
            command.model_dump_json().encode(),
            content_type=CONTENT_TYPE,
            message_id=f"sweep-{uuid.uuid4().hex}",
            delivery_mode=DeliveryMode.PERSISTENT,
            user_id=self._user_id,
        )
