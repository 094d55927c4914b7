"""Per-agent command streams and an independent model of what they must do."""

import random
from dataclasses import dataclass, field
from typing import Any

from tests.amqp_helpers import Outgoing, command

__all__ = ["Model", "Step", "make_workload"]


@dataclass(frozen=True, slots=True)
class Step:
    agent: str
    seq: int
    type: str
    tokens: int | None

    @property
    def message_id(self) -> str:
        return f"{self.agent}-{self.seq:05d}"

    def outgoing(self, reply_to: str | None = None, *, every: bool = False) -> Outgoing:
        """The command; with ``reply_to`` for queries, or for all with ``every``."""
        return Outgoing(
            command(self.type, self.agent, self.tokens),
            routing_key=self.agent,
            message_id=self.message_id,
            reply_to=reply_to if every or self.type.startswith("get_") else None,
            correlation_id=self.message_id,
        )


@dataclass
class Model:
    """What the books must say, computed without the service's code."""

    allocated: dict[str, int] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)
    applied: dict[str, list[str]] = field(default_factory=dict)
    #: What each query must have seen: message_id -> (allocated, used).
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Every state each agent passed through, in order, and where each query stood.
    states: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    query_position: dict[str, int] = field(default_factory=dict)
    state_changing: int = 0

    def apply(self, step: Step) -> None:
        agent = step.agent
        if step.type == "register_agent":
            self.state_changing += 1
            self.applied.setdefault(agent, [])
            return
        if step.type.startswith("get_"):
            self.seen[step.message_id] = (self.allocated.get(agent, 0), self.used.get(agent, 0))
            self.query_position[step.message_id] = len(self.states.get(agent, [])) - 1
            return
        self.state_changing += 1
        assert step.tokens is not None
        if step.type == "allocate":
            self.allocated[agent] = self.allocated.get(agent, 0) + step.tokens
        elif self.used.get(agent, 0) + step.tokens <= self.allocated.get(agent, 0):
            self.used[agent] = self.used.get(agent, 0) + step.tokens
        else:
            return  # refused: no ledger row
        self.applied[agent].append(step.message_id)
        self.states.setdefault(agent, []).append((self.allocated[agent], self.used.get(agent, 0)))

    def possible_answers(self, query_id: str) -> list[tuple[int, int]]:
        """States a query may report: the one at its place in the agent's stream,
        or a later one when it was redelivered after a crash (queries are not
        recorded, so a redelivery is answered anew)."""
        agent = query_id.rsplit("-", 1)[0]
        return self.states[agent][self.query_position[query_id] :]

    def balances(self) -> dict[str, tuple[int, int]]:
        return {a: (self.allocated[a], self.used.get(a, 0)) for a in self.allocated}


def make_workload(
    agents: int, per_agent: int, *, seed: int, queries: bool = True, prefix: str = "agent"
) -> tuple[list[list[Step]], Model]:
    """Rounds of steps: round r holds step r of every agent (one per agent)."""
    rng = random.Random(seed)
    names = [f"{prefix}-{index:04d}" for index in range(agents)]
    streams: list[list[Step]] = []
    for name in names:
        stream = [Step(name, 0, "register_agent", None), Step(name, 1, "allocate", 5_000)]
        for seq in range(2, per_agent):
            roll = rng.random()
            if roll < 0.08:
                stream.append(Step(name, seq, "allocate", rng.randint(1, 500)))
            elif queries and roll < 0.16:
                stream.append(Step(name, seq, rng.choice(["get_budget", "get_available"]), None))
            else:
                # Sometimes more than is left, so refusals are part of the mix.
                stream.append(Step(name, seq, "consume", rng.randint(1, 300)))
        streams.append(stream)
    model = Model()
    rounds: list[list[Step]] = []
    for seq in range(per_agent):
        round_ = [stream[seq] for stream in streams]
        for step in round_:
            model.apply(step)
        rounds.append(round_)
    return rounds, model


def describe(model: Model) -> dict[str, Any]:
    return {"agents": len(model.applied), "state_changing": model.state_changing}
