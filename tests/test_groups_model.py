"""A random tree of groups under random commands, against a model, on both databases.

The model knows nothing of the worker's code: every level (an agent, each
group above it) has an allocation (None: a group that limits nobody), usage
and holds; a member's change moves the agent and every group above it at
that moment, so usage stays where it was charged when the agent moves. A
charge is refused by the first level from the agent upward without room.
Holds expire as in ``test_periods_model``, on the agent's lane: before the
agent's next command (or the sweeper's), never by a read of its group.
"""

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.models import DatabaseMachine, run_against
from token_budget.schemas import ErrorCode, ErrorReply, OkReply, parse_command
from token_budget.worker.domain.outcomes import Envelope, Outcome, OutcomeKind
from token_budget.worker.store.queries import CommittedReader

T0 = datetime(2027, 6, 1, 12, 0, tzinfo=UTC)
MAX_DEPTH = 3


@dataclass
class Level:
    """One agent's or group's budget."""

    allocated: int | None
    used: int = 0
    reserved: int = 0

    @property
    def available(self) -> int | None:
        if self.allocated is None:
            return None
        return self.allocated - self.used - self.reserved


@dataclass(frozen=True)
class Hold:
    agent: str
    tokens: int
    expires: datetime


@dataclass
class Model:
    #: Agents and groups: one namespace.
    levels: dict[str, Level] = field(default_factory=dict)
    parent: dict[str, str | None] = field(default_factory=dict)
    group_of: dict[str, str | None] = field(default_factory=dict)
    #: Open holds, overdue ones included until the agent's lane expires them.
    holds: dict[str, Hold] = field(default_factory=dict)
    #: Closed holds -> their agent.
    closed: dict[str, str] = field(default_factory=dict)

    def chain(self, agent: str) -> list[str]:
        """The agent's groups, nearest first."""
        found, group = [], self.group_of[agent]
        while group is not None:
            found.append(group)
            group = self.parent[group]
        return found

    def charge(self, agent: str, used: int, reserved: int) -> None:
        for level in (agent, *self.chain(agent)):
            self.levels[level].used += used
            self.levels[level].reserved += reserved

    def before_command(self, agent: str, now: datetime) -> None:
        """The agent's lane expires its overdue holds before anything else."""
        for reservation, hold in sorted(self.holds.items()):
            if hold.agent == agent and hold.expires <= now:
                self.close(reservation)

    def close(self, reservation: str, used: int = 0) -> None:
        hold = self.holds.pop(reservation)
        self.closed[reservation] = hold.agent
        self.charge(hold.agent, used, -hold.tokens)

    def lacking(self, agent: str, growth: int) -> str | None:
        """The first level from the agent upward without room for ``growth``."""
        for level in (agent, *self.chain(agent)):
            available = self.levels[level].available
            if available is not None and growth > available:
                return level
        return None

    def overdue(self, now: datetime) -> list[str]:
        """Agents with an overdue open hold, most overdue first."""
        first: dict[str, datetime] = {}
        for hold in self.holds.values():
            if hold.expires <= now:
                first[hold.agent] = min(first.get(hold.agent, hold.expires), hold.expires)
        return sorted(first, key=lambda agent: (first[agent], agent))


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[tuple[int | None, int | None]], list[tuple[Any, int]]]:
    """Groups as (parent index, allocation), parents first; agents as (group index, allocation)."""
    groups: list[tuple[int | None, int | None]] = []

    def grow(parent: int | None, depth: int) -> None:
        groups.append((parent, draw(st.none() | st.integers(20, 300))))
        here = len(groups) - 1
        if depth < MAX_DEPTH:
            for _ in range(draw(st.integers(0, 2))):
                grow(here, depth + 1)

    for _ in range(draw(st.integers(1, 3))):
        grow(None, 1)
    member = st.sampled_from([None, *range(len(groups))])
    agents = draw(st.lists(st.tuples(member, st.integers(50, 400)), min_size=3, max_size=8))
    return groups, agents


class GroupsMachine(DatabaseMachine):
    start_at = T0

    def __init__(self) -> None:
        super().__init__()
        self.reader = CommittedReader(self.engine, clock=self.clock)
        self.prefix = uuid.uuid4().hex[:10]
        self.model = Model()
        self.agents: list[str] = []
        self.groups: list[str] = []
        self.sent: list[Envelope] = []

    def apply(self, service: Any, commands: list[dict[str, Any]]) -> list[Outcome]:
        envelopes = [Envelope(parse_command(json.dumps(c)), uuid.uuid4().hex) for c in commands]
        outcomes: list[Outcome] = self.loop.run_until_complete(service.apply(envelopes))
        self.sent.extend(e for e in envelopes if e.command.changes_state)
        return outcomes

    def send(self, fields: dict[str, Any]) -> Outcome:
        [outcome] = self.apply(self.service, [fields])
        return outcome

    def refusal(self, outcome: Outcome, code: ErrorCode) -> dict[str, Any]:
        assert outcome.kind is OutcomeKind.REFUSED, outcome
        assert isinstance(outcome.reply, ErrorReply) and outcome.reply.error.code == code, outcome
        body: dict[str, Any] = json.loads(outcome.body)["error"]
        return body

    def charged(self, agent: str, outcome: Outcome, growth: int, held: int = 0) -> bool:
        """Whether a charge of ``growth`` was applied; a refusal must name the level."""
        limit = self.model.lacking(agent, growth)
        if limit is None:
            assert outcome.kind is OutcomeKind.APPLIED, outcome
            return True
        error = self.refusal(outcome, ErrorCode.INSUFFICIENT_BUDGET)
        if not self.model.chain(agent):
            assert "limited_by" not in error
            return False
        assert error["limited_by"] == limit
        available = self.model.levels[limit].available
        assert available is not None
        assert error["available_tokens"] == available + (held if limit == agent else 0)
        return False

    @initialize(world=worlds())
    def start(
        self, world: tuple[list[tuple[int | None, int | None]], list[tuple[int | None, int]]]
    ) -> None:
        """The whole tree in one batch: parents first, then the agents."""
        groups, agents = world
        commands: list[dict[str, Any]] = []
        for i, (parent, allocated) in enumerate(groups):
            group = f"g-{self.prefix}-{i}"
            above = None if parent is None else self.groups[parent]
            self.groups.append(group)
            self.model.parent[group] = above
            self.model.levels[group] = Level(allocated)
            commands.append({"type": "register_group", "group_id": group, "parent_id": above})
            if allocated is not None:
                commands.append({"type": "allocate", "group_id": group, "tokens": allocated})
        for i, (member, allocated) in enumerate(agents):
            agent = f"a-{self.prefix}-{i}"
            group = None if member is None else self.groups[member]
            self.agents.append(agent)
            self.model.group_of[agent] = group
            self.model.levels[agent] = Level(allocated)
            commands.append({"type": "register_agent", "agent_id": agent, "group_id": group})
            commands.append({"type": "allocate", "agent_id": agent, "tokens": allocated})
        for outcome in self.apply(self.service, commands):
            assert outcome.kind is OutcomeKind.APPLIED, outcome

    def tokens(self, data: st.DataObject, agent: str, held: int = 0) -> int:
        """Any amount, or one that just fits or just misses some level above the agent."""
        edges = {
            available + held + extra
            for level in (agent, *self.model.chain(agent))
            if (available := self.model.levels[level].available) is not None
            for extra in (0, 1)
        }
        exact = sorted(t for t in edges if t >= (0 if held else 1))
        return data.draw(st.integers(0 if held else 1, 150) | st.sampled_from(exact))

    @rule(data=st.data())
    def consume(self, data: st.DataObject) -> None:
        agent = data.draw(st.sampled_from(self.agents))
        self.model.before_command(agent, self.clock())
        tokens = self.tokens(data, agent)
        outcome = self.send({"type": "consume", "agent_id": agent, "tokens": tokens})
        if self.charged(agent, outcome, tokens):
            self.model.charge(agent, tokens, 0)

    @rule(data=st.data(), ttl=st.integers(30, 900))
    def reserve(self, data: st.DataObject, ttl: int) -> None:
        agent = data.draw(st.sampled_from(self.agents))
        self.model.before_command(agent, self.clock())
        tokens = self.tokens(data, agent)
        command = {"type": "reserve", "agent_id": agent, "tokens": tokens, "ttl_seconds": ttl}
        outcome = self.send(command)
        if self.charged(agent, outcome, tokens):
            reply = outcome.reply
            assert isinstance(reply, OkReply) and reply.reservation_id is not None
            expires = self.clock() + timedelta(seconds=ttl)
            self.model.holds[reply.reservation_id] = Hold(agent, tokens, expires)
            self.model.charge(agent, 0, tokens)

    def a_hold(self, data: st.DataObject) -> tuple[str, str]:
        """A hold, open ones first: its lane may expire it before the command."""
        reservation = data.draw(st.sampled_from([*self.model.holds, *self.model.closed]))
        hold = self.model.holds.get(reservation)
        agent = hold.agent if hold is not None else self.model.closed[reservation]
        self.model.before_command(agent, self.clock())
        return reservation, agent

    @precondition(lambda self: self.model.holds or self.model.closed)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        reservation, agent = self.a_hold(data)
        hold = self.model.holds.get(reservation)
        held = 0 if hold is None else hold.tokens
        used = self.tokens(data, agent, held) if hold is not None else 1
        command = {"type": "commit", "agent_id": agent, "reservation_id": reservation}
        outcome = self.send({**command, "tokens": used})
        if hold is None:
            self.refusal(outcome, ErrorCode.RESERVATION_CLOSED)
        elif self.charged(agent, outcome, used - held, held):
            self.model.close(reservation, used)

    @precondition(lambda self: self.model.holds or self.model.closed)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        reservation, agent = self.a_hold(data)
        command = {"type": "release", "agent_id": agent, "reservation_id": reservation}
        outcome = self.send(command)
        if reservation in self.model.closed:
            self.refusal(outcome, ErrorCode.RESERVATION_CLOSED)
        else:
            assert outcome.kind is OutcomeKind.APPLIED, outcome
            self.model.close(reservation)

    @rule(data=st.data(), tokens=st.integers(1, 150))
    def allocate(self, data: st.DataObject, tokens: int) -> None:
        target = data.draw(st.sampled_from(self.agents + self.groups))
        level = self.model.levels[target]
        if target in self.model.group_of:
            self.model.before_command(target, self.clock())
            outcome = self.send({"type": "allocate", "agent_id": target, "tokens": tokens})
            assert outcome.kind is OutcomeKind.APPLIED, outcome
            level.allocated = (level.allocated or 0) + tokens
            return
        outcome = self.send({"type": "allocate", "group_id": target, "tokens": tokens})
        after = (level.allocated or 0) + tokens
        if level.used + level.reserved > after:
            error = self.refusal(outcome, ErrorCode.INSUFFICIENT_BUDGET)
            assert (error["limited_by"], error["available_tokens"]) == (target, after)
        else:
            assert outcome.kind is OutcomeKind.APPLIED, outcome
            level.allocated = after

    @rule(data=st.data())
    def set_group(self, data: st.DataObject) -> None:
        agent = data.draw(st.sampled_from(self.agents))
        group = data.draw(st.sampled_from([None, *self.groups]))
        self.model.before_command(agent, self.clock())
        outcome = self.send({"type": "set_group", "agent_id": agent, "group_id": group})
        if any(hold.agent == agent for hold in self.model.holds.values()):
            self.refusal(outcome, ErrorCode.HOLDS_OPEN)
        else:
            assert outcome.kind is OutcomeKind.APPLIED, outcome
            self.model.group_of[agent] = group

    @rule(seconds=st.one_of(st.integers(1, 120), st.integers(300, 3600)))
    def time_passes(self, seconds: int) -> None:
        self.clock.advance(seconds=seconds)

    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """A redelivery: its stored outcome, nothing applied (its agent's lane still expires)."""
        envelope = data.draw(st.sampled_from(self.sent))
        if not envelope.command.for_group:
            self.model.before_command(envelope.command.key, self.clock())
        [outcome] = self.loop.run_until_complete(self.service.apply([envelope]))
        assert outcome.kind is OutcomeKind.DUPLICATE, outcome

    @rule(data=st.data())
    def read_an_agent_on_its_lane(self, data: st.DataObject) -> None:
        agent = data.draw(st.sampled_from(self.agents))
        self.model.before_command(agent, self.clock())
        [outcome] = self.apply(self.service, [{"type": "get_budget", "agent_id": agent}])
        self.matches(agent, outcome)

    @rule()
    def the_sweeper_expires_what_is_overdue(self) -> None:
        mine = set(self.agents)
        overdue = self.loop.run_until_complete(self.service.overdue_agents())
        listed = [agent for agent in overdue if agent in mine]
        assert listed == self.model.overdue(self.clock())
        for agent in listed:
            self.model.before_command(agent, self.clock())
        sweeps = [{"type": "expire_reservations", "agent_id": agent} for agent in listed]
        self.apply(self.service, sweeps)

    def matches(self, level: str, outcome: Outcome) -> None:
        assert outcome.kind is OutcomeKind.QUERY, outcome
        reply = outcome.reply
        assert isinstance(reply, OkReply)
        model = self.model.levels[level]
        seen = (reply.allocated_tokens, reply.used_tokens, reply.reserved_tokens)
        assert seen == (model.allocated, model.used, model.reserved), level
        assert reply.available_tokens == model.available, level
        if reply.allocated_tokens is not None:
            assert reply.used_tokens + reply.reserved_tokens <= reply.allocated_tokens, level

    @invariant()
    def every_level_is_the_model(self) -> None:
        """Groups read on their lanes and as committed; agents as committed, which
        expires nothing: an overdue hold counts, at every level, until its lane acts."""
        if not self.agents:
            return
        on_lanes = [{"type": "get_budget", "group_id": g} for g in self.groups]
        for group, outcome in zip(self.groups, self.apply(self.service, on_lanes), strict=True):
            self.matches(group, outcome)
        everyone = [{"type": "get_budget", "agent_id": a} for a in self.agents] + on_lanes
        committed = self.apply(self.reader, everyone)
        for level, outcome in zip(self.agents + self.groups, committed, strict=True):
            self.matches(level, outcome)


def test_group_budgets_follow_the_model(engine: AsyncEngine, database_url: str) -> None:
    """``engine`` has migrated the database; the machine opens its own, in its own loop."""
    run_against(GroupsMachine, database_url, steps=30)
