"""Commands and clock jumps against a model of periodic budgets, on both databases.

The model knows nothing of the worker's calendar code: in UTC a period is an
index (minutes, hours or days since the epoch, ISO weeks, months), and usage
goes back to 0 whenever a command sees a later index than the last one.
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
    rule,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.models import DatabaseMachine, run_against
from token_budget.schemas import OkReply, parse_command
from token_budget.worker.domain.outcomes import Envelope, OutcomeKind
from token_budget.worker.store.audit import history

T0 = datetime(2027, 2, 28, 23, 58, tzinfo=UTC)
PERIODS = ("minute", "hour", "day", "week", "month")


def index(period: str, moment: datetime) -> int:
    seconds = int(moment.timestamp())
    if period == "minute":
        return seconds // 60
    if period == "hour":
        return seconds // 3600
    if period == "day":
        return moment.date().toordinal()
    if period == "week":
        return (moment.date().toordinal() - 1) // 7  # day 1 of year 1 was a Monday
    return moment.year * 12 + moment.month


@dataclass
class Model:
    allocated: int
    used: int = 0
    period: str | None = None
    current: int = 0
    resets: int = 0
    #: reservation id -> (tokens, expires_at)
    holds: dict[str, tuple[int, datetime]] = field(default_factory=dict)

    @property
    def reserved(self) -> int:
        return sum(tokens for tokens, _ in self.holds.values())

    @property
    def available(self) -> int:
        return self.allocated - self.used - self.reserved

    def before_command(self, now: datetime) -> None:
        self.holds = {r: h for r, h in self.holds.items() if h[1] > now}
        if self.period is not None and index(self.period, now) > self.current:
            self.current = index(self.period, now)
            if self.used:
                self.used, self.resets = 0, self.resets + 1


class PeriodsMachine(DatabaseMachine):
    start_at = T0

    def __init__(self) -> None:
        super().__init__()
        self.agent = f"p-{uuid.uuid4().hex[:10]}"
        self.sent: list[Envelope] = []

    def send(self, fields: dict[str, Any], message_id: str | None = None) -> Any:
        body = json.dumps({"agent_id": self.agent, **fields})
        envelope = Envelope(parse_command(body), message_id or uuid.uuid4().hex)
        [outcome] = self.loop.run_until_complete(self.service.apply([envelope]))
        if fields["type"] != "get_budget":
            self.sent.append(envelope)
        return outcome

    def check_books(self) -> None:
        entries = self.loop.run_until_complete(history(self.engine, self.agent))
        assert sum(e.kind == "reset" for e in entries) == self.model.resets

    @initialize(allocated=st.integers(1, 500))
    def start(self, allocated: int) -> None:
        self.model = Model(allocated)
        self.send({"type": "register_agent"})
        self.send({"type": "allocate", "tokens": allocated})

    @rule(period=st.sampled_from((*PERIODS, None)))
    def set_period(self, period: str | None) -> None:
        self.model.before_command(self.clock())
        self.send({"type": "set_period", "period": period})
        self.model.period = period
        if period is not None:
            self.model.current = index(period, self.clock())

    @rule(tokens=st.integers(1, 200))
    def consume(self, tokens: int) -> None:
        self.model.before_command(self.clock())
        outcome = self.send({"type": "consume", "tokens": tokens})
        if tokens <= self.model.available:
            assert outcome.kind is OutcomeKind.APPLIED
            self.model.used += tokens
        else:
            assert outcome.kind is OutcomeKind.REFUSED

    @rule(tokens=st.integers(1, 100))
    def allocate(self, tokens: int) -> None:
        self.model.before_command(self.clock())
        self.send({"type": "allocate", "tokens": tokens})
        self.model.allocated += tokens

    @rule(tokens=st.integers(1, 150), ttl=st.integers(30, 7200))
    def reserve(self, tokens: int, ttl: int) -> None:
        self.model.before_command(self.clock())
        outcome = self.send({"type": "reserve", "tokens": tokens, "ttl_seconds": ttl})
        if tokens <= self.model.available:
            reply = outcome.reply
            assert isinstance(reply, OkReply) and reply.reservation_id is not None
            expires = self.clock() + timedelta(seconds=ttl)
            self.model.holds[reply.reservation_id] = (tokens, expires)
        else:
            assert outcome.kind is OutcomeKind.REFUSED

    @rule(data=st.data(), used=st.integers(0, 150))
    def commit(self, data: st.DataObject, used: int) -> None:
        self.model.before_command(self.clock())
        if not self.model.holds:
            return
        reservation = data.draw(st.sampled_from(sorted(self.model.holds)))
        command = {"type": "commit", "reservation_id": reservation, "tokens": used}
        outcome = self.send(command)
        held, _ = self.model.holds[reservation]
        if used <= self.model.available + held:
            assert outcome.kind is OutcomeKind.APPLIED
            del self.model.holds[reservation]
            self.model.used += used
        else:
            assert outcome.kind is OutcomeKind.REFUSED

    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        """A redelivery or a retried message_id, maybe from an earlier period."""
        if not self.sent:
            return
        self.model.before_command(self.clock())
        envelope = data.draw(st.sampled_from(self.sent))
        [outcome] = self.loop.run_until_complete(self.service.apply([envelope]))
        assert outcome.kind is OutcomeKind.DUPLICATE

    @rule(
        seconds=st.one_of(st.integers(1, 90), st.integers(3000, 4000), st.integers(1, 40 * 86400))
    )
    def time_passes(self, seconds: int) -> None:
        self.clock.advance(seconds=seconds)

    @rule(seconds=st.integers(1, 120))
    def a_clock_behind(self, seconds: int) -> None:
        """Another host's clock, slightly behind: it must not reset anything again."""
        self.clock.advance(seconds=-seconds)

    @rule()
    def to_the_next_minute(self) -> None:
        now = self.clock()
        self.clock.set(now.replace(second=0, microsecond=0) + timedelta(minutes=1))

    @invariant()
    def the_budget_is_the_model(self) -> None:
        if not hasattr(self, "model"):
            return
        self.model.before_command(self.clock())
        reply = self.send({"type": "get_budget"}).reply
        assert isinstance(reply, OkReply)
        seen = (reply.allocated_tokens, reply.used_tokens, reply.reserved_tokens)
        assert seen == (self.model.allocated, self.model.used, self.model.reserved)
        assert (reply.period.value if reply.period else None) == self.model.period


def test_periodic_budgets_follow_the_model(engine: AsyncEngine, database_url: str) -> None:
    """``engine`` has migrated the database; the machine opens its own, in its own loop."""
    run_against(PeriodsMachine, database_url, steps=25)
