"""Holds and thresholds in worker.rules, against an independent model of budgets."""

from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from token_budget.schemas import (
    Allocate,
    Command,
    Commit,
    Consume,
    ErrorCode,
    GetBudget,
    Release,
    Reserve,
    SetThresholds,
)
from token_budget.worker.domain.errors import BudgetError
from token_budget.worker.domain.reservations import expire_due, reservation_id_for
from token_budget.worker.domain.rules import AgentState, RuleContext, apply_rule

T0 = datetime(2026, 1, 1, tzinfo=UTC)
#: What each ledger kind does to (allocated, used, reserved), written here
#: independently of worker.audit.
EFFECTS = {
    "allocate": (1, 0, 0),
    "consume": (0, 1, 0),
    "reserve": (0, 0, 1),
    "release": (0, 0, -1),
    "expire": (0, 0, -1),
    "settle": (0, 0, -1),
    "commit": (0, 1, 0),
}


class Model:
    """One agent's budget, holds and thresholds, kept without the rules' help.

    Fired thresholds are tracked as explicit state here, while the rules
    derive them from the balance: the two must agree.
    """

    def __init__(self, allocated: int) -> None:
        self.allocated, self.used = allocated, 0
        self.holds: dict[str, tuple[int, datetime]] = {}  # name -> (tokens, deadline)
        self.closed: dict[str, str] = {}
        self.thresholds = [50, 80, 100]
        self.fired: set[int] = set()
        self.events: list[tuple[int, int, int]] = []  # (threshold, allocated, used)

    @property
    def available(self) -> int:
        return self.allocated - self.used - sum(t for t, _ in self.holds.values())

    def expire(self, now: datetime) -> None:
        for name, (_, deadline) in list(self.holds.items()):
            if deadline <= now:
                del self.holds[name]
                self.closed[name] = "expired"

    def _use(self, tokens: int) -> None:
        self.used += tokens
        for p in sorted(self.thresholds):
            if p not in self.fired and self.used * 100 >= p * self.allocated:
                self.fired.add(p)
                self.events.append((p, self.allocated, self.used))

    def apply(self, op: str, name: str, tokens: int, now: datetime, ttl: int) -> Any:
        """None if applied, else the refusal's code (and details)."""
        self.expire(now)
        if op == "allocate":
            self.allocated += tokens
            self.fired = {p for p in self.fired if self.used * 100 >= p * self.allocated}
        elif op == "consume":
            if tokens > self.available:
                return ErrorCode.INSUFFICIENT_BUDGET, tokens, self.available
            self._use(tokens)
        elif op == "reserve":
            if tokens > self.available:
                return ErrorCode.INSUFFICIENT_BUDGET, tokens, self.available
            self.holds[name] = (tokens, now + timedelta(seconds=ttl))
        elif op in ("commit", "release"):
            if name in self.closed:
                return ErrorCode.RESERVATION_CLOSED
            if name not in self.holds:
                return ErrorCode.RESERVATION_NOT_FOUND
            held = self.holds[name][0]
            if op == "commit" and tokens > self.available + held:
                return ErrorCode.INSUFFICIENT_BUDGET, tokens, self.available + held
            del self.holds[name]
            self.closed[name] = "committed" if op == "commit" else "released"
            if op == "commit":
                self._use(tokens)
        return None


def command_for(op: str, reservation_id: str, tokens: int, ttl: int) -> Command:
    if op == "allocate":
        return Allocate(type="allocate", agent_id="a", tokens=tokens)
    if op == "consume":
        return Consume(type="consume", agent_id="a", tokens=tokens)
    if op == "reserve":
        return Reserve(type="reserve", agent_id="a", tokens=tokens, ttl_seconds=ttl)
    if op == "commit":
        return Commit(type="commit", agent_id="a", reservation_id=reservation_id, tokens=tokens)
    return Release(type="release", agent_id="a", reservation_id=reservation_id)


class HoldsMachine(RuleBasedStateMachine):
    @initialize(allocated=st.integers(min_value=1, max_value=300))
    def start(self, allocated: int) -> None:
        self.model = Model(allocated)
        self.state = AgentState("a", registered=True, has_budget=True, allocated=allocated)
        self.now = T0
        self.steps = 0
        self.names: list[str] = []  # message ids of the reserves sent, refused ones too

    def run(self, op: str, name: str, tokens: int, ttl: int = 60) -> None:
        self.steps += 1
        message_id = name if op == "reserve" else f"m{self.steps}"
        reservation_id = reservation_id_for(name) if name else "never-made"
        expected = self.model.apply(op, name, tokens, self.now, ttl)
        expire_due(self.state, self.now)
        before = asdict(self.state)
        ctx = RuleContext(self.now, message_id)
        try:
            reply, _ = apply_rule(self.state, command_for(op, reservation_id, tokens, ttl), ctx)
        except BudgetError as refusal:
            body = refusal.to_body()
            if isinstance(expected, tuple):
                assert (body.code, body.requested_tokens, body.available_tokens) == expected
            else:
                assert body.code == expected, (op, body)
            assert asdict(self.state) == before, "a refusal changed the state"
            return
        assert expected is None, (op, tokens, expected)
        assert reply.available_tokens == self.model.available
        if op == "reserve":
            assert reply.reservation_id == reservation_id
            assert reply.expires_at == self.now + timedelta(seconds=ttl)

    @rule(tokens=st.integers(1, 120), ttl=st.integers(1, 90))
    def reserve(self, tokens: int, ttl: int) -> None:
        name = f"r{len(self.names)}"
        self.names.append(name)
        self.run("reserve", name, tokens, ttl)

    @rule(pick=st.integers(0, 20), tokens=st.integers(0, 150))
    def commit(self, pick: int, tokens: int) -> None:
        name = self.names[pick % len(self.names)] if self.names else ""
        self.run("commit", name, tokens)

    @rule(pick=st.integers(min_value=0, max_value=20))
    def release(self, pick: int) -> None:
        name = self.names[pick % len(self.names)] if self.names else ""
        self.run("release", name, 0)

    @rule(op=st.sampled_from(["consume", "allocate"]), tokens=st.integers(1, 80))
    def balance(self, op: str, tokens: int) -> None:
        self.run(op, "", tokens)

    @rule(thresholds=st.lists(st.integers(min_value=1, max_value=100), max_size=5))
    def set_thresholds(self, thresholds: list[int]) -> None:
        self.model.expire(self.now)
        expire_due(self.state, self.now)
        apply_rule(
            self.state,
            SetThresholds(type="set_thresholds", agent_id="a", thresholds=tuple(thresholds)),
        )
        self.model.thresholds = sorted(set(thresholds))
        self.model.fired = {
            p for p in self.model.thresholds if self.model.used * 100 >= p * self.model.allocated
        }

    @rule(seconds=st.integers(min_value=1, max_value=60))
    def wait(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule()
    def query(self) -> None:
        self.model.expire(self.now)
        expire_due(self.state, self.now)
        reply, change = apply_rule(self.state, GetBudget(type="get_budget", agent_id="a"))
        assert change is None
        assert reply.reserved_tokens == sum(t for t, _ in self.model.holds.values())

    @invariant()
    def never_holds_or_uses_more_than_allocated(self) -> None:
        state = self.state
        assert state.reserved >= 0 and state.used >= 0
        assert state.used + state.reserved <= state.allocated

    @invariant()
    def matches_the_model(self) -> None:
        state, model = self.state, self.model
        assert (state.allocated, state.used) == (model.allocated, model.used)
        open_holds = {h.reservation_id: h.tokens for h in state.holds.values() if h.is_open}
        assert open_holds == {reservation_id_for(n): t for n, (t, _) in model.holds.items()}
        assert state.reserved == sum(open_holds.values())
        assert [(c.threshold, c.allocated, c.used) for c in state.crossings] == model.events

    @invariant()
    def the_ledger_replays_to_the_balance(self) -> None:
        totals = [0, 0, 0]
        for change in self.state.changes:
            assert change.amount > 0
            for i, effect in enumerate(EFFECTS[change.kind]):
                totals[i] += effect * change.amount
            assert change.used_after + change.reserved_after <= change.allocated_after
        start = self.state.allocated - totals[0]
        assert (totals[1], totals[2]) == (self.state.used, self.state.reserved)
        assert start >= 0


TestHoldsAgainstModel = HoldsMachine.TestCase
TestHoldsAgainstModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# --- single rules, stated once each ------------------------------------------------


def budget(allocated: int = 100, used: int = 0) -> AgentState:
    return AgentState("a", registered=True, has_budget=True, allocated=allocated, used=used)


def reserve(
    state: AgentState, tokens: int, message_id: str = "r1", ttl: int = 60, now: datetime = T0
) -> str:
    reply, _ = apply_rule(
        state,
        Reserve(type="reserve", agent_id="a", tokens=tokens, ttl_seconds=ttl),
        RuleContext(now, message_id),
    )
    assert reply.reservation_id is not None
    return reply.reservation_id


def commit(state: AgentState, reservation_id: str, tokens: int) -> Any:
    command = Commit(type="commit", agent_id="a", reservation_id=reservation_id, tokens=tokens)
    return apply_rule(state, command, RuleContext(T0, "c1"))


def test_a_reserve_holds_tokens_that_are_then_not_available() -> None:
    state = budget(100, used=10)
    reserve(state, 60)
    assert (state.used, state.reserved, state.available) == (10, 60, 30)
    with pytest.raises(BudgetError) as refused:
        reserve(state, 31, "r2")
    assert refused.value.code is ErrorCode.INSUFFICIENT_BUDGET


def test_the_reservation_id_depends_only_on_the_message_id() -> None:
    assert reserve(budget(), 5, "same") == reserve(budget(), 7, "same") != reserve(budget(), 5, "x")


def test_a_commit_writes_settle_then_commit_and_frees_the_rest() -> None:
    state = budget(100)
    rid = reserve(state, 60)
    reply, _ = commit(state, rid, 45)
    assert (reply.used_tokens, reply.reserved_tokens, reply.available_tokens) == (45, 0, 55)
    assert [(c.kind, c.amount, c.used_after, c.reserved_after) for c in state.changes] == [
        ("reserve", 60, 0, 60),
        ("settle", 60, 0, 0),
        ("commit", 45, 45, 0),
    ]


def test_a_commit_of_zero_tokens_frees_the_hold_and_uses_nothing() -> None:
    state = budget(100)
    rid = reserve(state, 60)
    commit(state, rid, 0)
    assert (state.used, state.reserved) == (0, 0)
    assert [c.kind for c in state.changes] == ["reserve", "settle"]


def test_a_commit_may_use_more_than_its_hold_only_while_the_budget_has_room() -> None:
    state = budget(100)
    rid = reserve(state, 10)
    reserve(state, 50, "r2")
    with pytest.raises(BudgetError) as refused:
        commit(state, rid, 51)
    body = refused.value.to_body()
    assert (body.code, body.requested_tokens, body.available_tokens) == (
        ErrorCode.INSUFFICIENT_BUDGET,
        51,
        50,
    )
    assert state.holds[rid].is_open
    commit(state, rid, 50)
    assert (state.used, state.reserved) == (50, 50)


def test_a_settled_hold_cannot_be_committed_or_released_again() -> None:
    state = budget(100)
    rid = reserve(state, 10)
    apply_rule(
        state, Release(type="release", agent_id="a", reservation_id=rid), RuleContext(T0, "rel")
    )
    with pytest.raises(BudgetError) as refused:
        commit(state, rid, 1)
    assert refused.value.code is ErrorCode.RESERVATION_CLOSED
    assert "released" in refused.value.message


def test_a_reservation_of_another_agent_is_not_found() -> None:
    other = AgentState("b", registered=True, has_budget=True, allocated=100)
    rid = reserve(other, 10)
    state = budget(100)
    state.holds[rid] = other.holds[rid]
    with pytest.raises(BudgetError) as refused:
        commit(state, rid, 1)
    assert refused.value.code is ErrorCode.RESERVATION_NOT_FOUND


def test_expiry_frees_holds_at_their_deadline_oldest_first() -> None:
    state = budget(100)
    late = reserve(state, 10, "late", ttl=30)
    early = reserve(state, 20, "early", ttl=10)
    assert expire_due(state, T0 + timedelta(seconds=9)) == []
    changes = expire_due(state, T0 + timedelta(seconds=30))
    assert [(c.kind, c.reservation_id, c.message_id) for c in changes] == [
        ("expire", early, f"expire:{early}"),
        ("expire", late, f"expire:{late}"),
    ]
    assert state.reserved == 0
    assert state.holds[early].status == "expired"


def test_thresholds_are_crossed_by_usage_not_by_holds() -> None:
    state = budget(100)
    rid = reserve(state, 90)
    assert state.crossings == []
    commit(state, rid, 85)
    assert [(c.threshold, c.used, c.command_type) for c in state.crossings] == [
        (50, 85, "commit"),
        (80, 85, "commit"),
    ]


def test_an_allocation_that_lowers_usage_below_a_threshold_rearms_it() -> None:
    state = budget(100)
    apply_rule(state, Consume(type="consume", agent_id="a", tokens=60))
    apply_rule(state, Allocate(type="allocate", agent_id="a", tokens=100))  # 60/200 = 30%
    apply_rule(state, Consume(type="consume", agent_id="a", tokens=40))  # 100/200 = 50%
    assert [(c.threshold, c.allocated, c.used) for c in state.crossings] == [
        (50, 100, 60),
        (50, 200, 100),
    ]


def test_thresholds_set_below_the_current_usage_do_not_fire() -> None:
    state = budget(100, used=70)
    apply_rule(state, SetThresholds(type="set_thresholds", agent_id="a", thresholds=(60, 75)))
    apply_rule(state, Consume(type="consume", agent_id="a", tokens=10))
    assert [c.threshold for c in state.crossings] == [75]
