"""Running a hypothesis state machine against one database of the suite."""

import asyncio
from datetime import datetime
from typing import ClassVar

from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.clock import Clock
from token_budget.worker.store.audit import reconcile
from token_budget.worker.store.db import create_engine
from token_budget.worker.store.service import BudgetService

__all__ = ["DatabaseMachine", "run_against"]


class DatabaseMachine(RuleBasedStateMachine):
    """A state machine over ``BudgetService`` on a database of its own loop and
    clock; every run ends with the books reconciled (``check_books`` for more)."""

    database_url: ClassVar[str]
    start_at: ClassVar[datetime]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.engine: AsyncEngine = create_engine(self.database_url)
        self.clock = Clock(self.start_at)
        self.service = BudgetService(self.engine, clock=self.clock)

    def check_books(self) -> None:
        """Further checks at the end of a run, after reconcile."""

    def teardown(self) -> None:
        try:
            assert self.loop.run_until_complete(reconcile(self.engine)) == []
            self.check_books()
        finally:
            self.loop.run_until_complete(self.engine.dispose())
            self.loop.close()


def run_against(machine: type[RuleBasedStateMachine], database_url: str, *, steps: int) -> None:
    """Run ``machine`` (which reads ``database_url`` from its class) 20 times,
    ``steps`` rules each. Each example is a real transaction or more: no
    deadline, and slowness is not a failure."""
    bound = type(machine.__name__, (machine,), {"database_url": database_url})
    run_state_machine_as_test(
        bound,
        settings=settings(
            max_examples=20,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
