"""worker.rules against an independent model of budgets kept in plain dicts."""

import copy
from dataclasses import asdict
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from token_budget.schemas import (
    MAX_BALANCE,
    MAX_TOKENS,
    Allocate,
    Command,
    Consume,
    ErrorCode,
    GetAvailable,
    GetBudget,
    OkReply,
    RegisterAgent,
)
from token_budget.worker.domain.errors import BudgetError, InsufficientBudget
from token_budget.worker.domain.rules import AgentState, Change, apply_rule

AGENTS = ("a", "b", "c")
KINDS = ("register_agent", "allocate", "consume", "get_budget", "get_available")

#: Mostly small amounts so that consumes both pass and fail, now and then huge ones.
amounts = st.one_of(
    st.integers(min_value=1, max_value=60),
    st.integers(min_value=1, max_value=MAX_TOKENS),
    st.just(MAX_TOKENS),
)
#: Starting balances, some close enough to MAX_BALANCE for an allocate to overflow.
starting_allocations = st.one_of(
    st.integers(min_value=0, max_value=200),
    st.integers(min_value=MAX_BALANCE - 3 * MAX_TOKENS, max_value=MAX_BALANCE),
    st.integers(min_value=MAX_BALANCE - 60, max_value=MAX_BALANCE),
)


def make_command(kind: str, agent_id: str, amount: int) -> Command:
    if kind == "register_agent":
        return RegisterAgent(type="register_agent", agent_id=agent_id)
    if kind == "allocate":
        return Allocate(type="allocate", agent_id=agent_id, tokens=amount)
    if kind == "consume":
        return Consume(type="consume", agent_id=agent_id, tokens=amount)
    if kind == "get_budget":
        return GetBudget(type="get_budget", agent_id=agent_id)
    return GetAvailable(type="get_available", agent_id=agent_id)


class Model:
    """What the rules should do, written without looking at how they do it."""

    def __init__(self) -> None:
        self.registered: dict[str, bool] = {}
        #: agent -> {"allocated": n, "used": n}; absent until the first allocate.
        self.budgets: dict[str, dict[str, int]] = {}
        #: agent -> [(kind, amount, allocated_after, used_after)]
        self.ledger: dict[str, list[tuple[str, int, int, int]]] = {}

    def reply(self, agent_id: str) -> dict[str, Any]:
        budget = self.budgets.get(agent_id)
        if budget is None:
            return {
                "agent_id": agent_id,
                "allocated_tokens": None,
                "used_tokens": None,
                "available_tokens": None,
            }
        return {
            "agent_id": agent_id,
            "allocated_tokens": budget["allocated"],
            "used_tokens": budget["used"],
            "available_tokens": budget["allocated"] - budget["used"],
        }

    def apply(self, kind: str, agent_id: str, amount: int) -> tuple[str, Any]:
        """("ok", reply fields) or ("refused", (code, extra details))."""
        if kind == "register_agent":
            self.registered[agent_id] = True
            return "ok", self.reply(agent_id)
        if not self.registered.get(agent_id):
            return "refused", (ErrorCode.AGENT_NOT_FOUND, None)
        budget = self.budgets.get(agent_id)
        if kind == "allocate":
            allocated = budget["allocated"] if budget else 0
            if allocated + amount > MAX_BALANCE:
                return "refused", (ErrorCode.BALANCE_OVERFLOW, None)
            budget = self.budgets.setdefault(agent_id, {"allocated": 0, "used": 0})
            budget["allocated"] += amount
            self._record(agent_id, "allocate", amount)
            return "ok", self.reply(agent_id)
        if budget is None:
            return "refused", (ErrorCode.BUDGET_NOT_FOUND, None)
        if kind == "consume":
            available = budget["allocated"] - budget["used"]
            if amount > available:
                return "refused", (ErrorCode.INSUFFICIENT_BUDGET, (amount, available))
            budget["used"] += amount
            self._record(agent_id, "consume", amount)
        return "ok", self.reply(agent_id)

    def _record(self, agent_id: str, kind: str, amount: int) -> None:
        budget = self.budgets[agent_id]
        self.ledger.setdefault(agent_id, []).append(
            (kind, amount, budget["allocated"], budget["used"])
        )


class RulesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.states: dict[str, AgentState] = {}

    @initialize(
        starts=st.tuples(
            *[
                st.one_of(
                    st.just("unregistered"),
                    st.just("registered"),
                    starting_allocations.flatmap(
                        lambda allocated: st.tuples(
                            st.just(allocated), st.integers(min_value=0, max_value=allocated)
                        )
                    ),
                )
                for _ in AGENTS
            ]
        )
    )
    def start(self, starts: tuple[Any, ...]) -> None:
        for agent_id, start in zip(AGENTS, starts, strict=True):
            state = AgentState(agent_id)
            if start != "unregistered":
                state.registered = True
                self.model.registered[agent_id] = True
            if isinstance(start, tuple):
                allocated, used = start
                state.has_budget = True
                state.allocated, state.used = allocated, used
                self.model.budgets[agent_id] = {"allocated": allocated, "used": used}
            self.states[agent_id] = state

    @rule(agent_id=st.sampled_from(AGENTS), kind=st.sampled_from(KINDS), amount=amounts)
    def apply(self, agent_id: str, kind: str, amount: int) -> None:
        state = self.states[agent_id]
        before = copy.deepcopy(asdict(state))
        outcome, expected = self.model.apply(kind, agent_id, amount)
        try:
            reply, change = apply_rule(state, make_command(kind, agent_id, amount))
        except BudgetError as refusal:
            assert outcome == "refused", f"refused {kind} {amount}: {refusal}"
            code, details = expected
            assert refusal.code == code
            body = refusal.to_body()
            assert body.code == code
            if code is ErrorCode.INSUFFICIENT_BUDGET:
                assert isinstance(refusal, InsufficientBudget)
                assert (body.requested_tokens, body.available_tokens) == details
            assert asdict(state) == before, "a refused command changed the state"
            return
        assert outcome == "ok", f"applied {kind} {amount}, the model refuses with {expected}"
        assert reply == OkReply(**expected)
        if kind in ("allocate", "consume"):
            assert change is not None
            assert change == state.changes[-1]
            assert (change.kind, change.amount) == (kind, amount)
        else:
            assert change is None
            expected_state = dict(before)
            if kind == "register_agent":
                expected_state["registered"] = True
                expected_state["new_agent"] = before["new_agent"] or not before["registered"]
            assert asdict(state) == expected_state, f"{kind} changed more than it should"

    @rule(agent_id=st.sampled_from(AGENTS), overshoot=st.integers(min_value=-1, max_value=1))
    def allocate_up_to_the_largest_balance(self, agent_id: str, overshoot: int) -> None:
        # Random amounts rarely land exactly on the bound; aim at it.
        amount = MAX_BALANCE - self.states[agent_id].allocated + overshoot
        self.apply(agent_id, "allocate", min(max(amount, 1), MAX_TOKENS))

    @invariant()
    def used_never_exceeds_allocated(self) -> None:
        for state in self.states.values():
            assert 0 <= state.used <= state.allocated <= MAX_BALANCE
            assert state.available == state.allocated - state.used

    @invariant()
    def state_matches_the_model(self) -> None:
        for agent_id, state in self.states.items():
            assert state.registered is self.model.registered.get(agent_id, False)
            budget = self.model.budgets.get(agent_id)
            assert state.has_budget is (budget is not None)
            if budget is not None:
                assert (state.allocated, state.used) == (budget["allocated"], budget["used"])

    @invariant()
    def ledger_is_numbered_one_to_n_without_gaps(self) -> None:
        for agent_id, state in self.states.items():
            expected = self.model.ledger.get(agent_id, [])
            assert [change.seq for change in state.changes] == list(range(1, len(expected) + 1))
            assert state.seq == len(expected)
            assert [
                (c.kind, c.amount, c.allocated_after, c.used_after) for c in state.changes
            ] == expected


TestRulesAgainstModel = RulesMachine.TestCase
TestRulesAgainstModel.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# --- single rules the machine exercises, stated once each -----------------------


def registered(agent_id: str = "a", allocated: int | None = None, used: int = 0) -> AgentState:
    state = AgentState(agent_id, registered=True)
    if allocated is not None:
        state.has_budget, state.allocated, state.used = True, allocated, used
    return state


def test_register_marks_only_an_unknown_agent_as_new() -> None:
    fresh = AgentState("a")
    apply_rule(fresh, RegisterAgent(type="register_agent", agent_id="a"))
    assert fresh.registered and fresh.new_agent
    known = registered()
    apply_rule(known, RegisterAgent(type="register_agent", agent_id="a"))
    assert not known.new_agent


def test_register_of_an_agent_with_a_budget_answers_the_budget() -> None:
    reply, change = apply_rule(
        registered(allocated=10, used=4), RegisterAgent(type="register_agent", agent_id="a")
    )
    assert change is None
    assert (reply.allocated_tokens, reply.used_tokens, reply.available_tokens) == (10, 4, 6)


def test_consuming_exactly_the_available_tokens_is_allowed() -> None:
    state = registered(allocated=10, used=4)
    reply, change = apply_rule(state, Consume(type="consume", agent_id="a", tokens=6))
    assert reply.available_tokens == 0
    assert change == Change("consume", 6, 1, 10, 10)


def test_allocating_up_to_the_largest_balance_is_allowed_and_one_more_is_not() -> None:
    state = registered(allocated=MAX_BALANCE - 5)
    apply_rule(state, Allocate(type="allocate", agent_id="a", tokens=5))
    assert state.allocated == MAX_BALANCE
    with pytest.raises(BudgetError) as info:
        apply_rule(state, Allocate(type="allocate", agent_id="a", tokens=1))
    assert info.value.code is ErrorCode.BALANCE_OVERFLOW
    assert state.allocated == MAX_BALANCE
