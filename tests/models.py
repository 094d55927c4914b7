"""Running a hypothesis state machine against one database of the suite."""

from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

__all__ = ["run_against"]


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
