"""Commands agents publish to ``budget.commands``.

Validation is strict on purpose: a string, float or boolean where an integer
belongs, an unknown field or an unknown ``type`` is refused, so that a typo in
a producer never passes silently.
"""

from enum import StrEnum
from typing import Annotated, ClassVar, Literal, Self, TypeAlias
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    model_validator,
)

from .limits import (
    AGENT_ID_MAX_LENGTH,
    AGENT_ID_PATTERN,
    MAX_RESERVATION_TTL_SECONDS,
    MAX_THRESHOLDS,
    MAX_TOKENS,
    RESERVATION_ID_PATTERN,
    TIMEZONE_MAX_LENGTH,
    TIMEZONE_PATTERN,
)

__all__ = [
    "COMMAND_ADAPTER",
    "AgentId",
    "Allocate",
    "Command",
    "CommandType",
    "Commit",
    "Consistency",
    "Consume",
    "ExpireReservations",
    "GetAvailable",
    "GetBudget",
    "GroupId",
    "Period",
    "RegisterAgent",
    "RegisterGroup",
    "Release",
    "ReservationId",
    "Reserve",
    "SetGroup",
    "SetPeriod",
    "SetThresholds",
    "Thresholds",
    "TimeZone",
    "Tokens",
    "UsedTokens",
    "is_committed_query",
    "parse_command",
]


class CommandType(StrEnum):
    """The ``type`` field of every command, as on the wire."""

    REGISTER_AGENT = "register_agent"
    ALLOCATE = "allocate"
    CONSUME = "consume"
    GET_BUDGET = "get_budget"
    GET_AVAILABLE = "get_available"
    RESERVE = "reserve"
    COMMIT = "commit"
    RELEASE = "release"
    SET_THRESHOLDS = "set_thresholds"
    SET_PERIOD = "set_period"
    REGISTER_GROUP = "register_group"
    SET_GROUP = "set_group"
    #: Internal: published by the workers' sweeper (docs/protocol.md, §4).
    EXPIRE_RESERVATIONS = "expire_reservations"


class Consistency(StrEnum):
    """What a query's answer reflects (the ``consistency`` field, §4.1 of docs/protocol.md)."""

    #: On the agent's lane, behind its earlier commands: sees every one of
    #: them (the default, also when the field is absent).
    READ_YOUR_WRITES = "read_your_writes"
    #: On ``budget.queries``, at once: the state as last committed, which may
    #: not yet include commands still queued on the agent's lane.
    COMMITTED = "committed"


class Period(StrEnum):
    """How often a budget's usage goes back to 0 (``set_period``, §4.5 of docs/protocol.md).

    Boundaries are calendar ones in the budget's time zone: whole minutes and
    hours, local midnight, Monday 00:00 (ISO weeks), the 1st at 00:00.
    """

    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"
    MONTH = "month"


def _known_zone(name: str) -> str:
    # The pattern first: ZoneInfo would otherwise look up any path it is given.
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as 'UTC' or 'Europe/Berlin'"
        ) from None
    return name


#: An IANA time zone name, known to the worker's time zone database.
TimeZone: TypeAlias = Annotated[
    str,
    StringConstraints(
        strict=True, min_length=1, max_length=TIMEZONE_MAX_LENGTH, pattern=TIMEZONE_PATTERN
    ),
    AfterValidator(_known_zone),
]


AgentId: TypeAlias = Annotated[
    str,
    StringConstraints(
        strict=True, min_length=1, max_length=AGENT_ID_MAX_LENGTH, pattern=AGENT_ID_PATTERN
    ),
]
#: Group ids follow the agent id rules, and share their namespace: no group
#: has an agent's id.
GroupId: TypeAlias = AgentId
Tokens: TypeAlias = Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS)]
#: What a ``commit`` reports as really used: 0 means the hold was not needed.
UsedTokens: TypeAlias = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS)]
TtlSeconds: TypeAlias = Annotated[int, Field(strict=True, ge=1, le=MAX_RESERVATION_TTL_SECONDS)]
ReservationId: TypeAlias = Annotated[
    str, StringConstraints(strict=True, min_length=1, max_length=64, pattern=RESERVATION_ID_PATTERN)
]


def _normalized(values: tuple[int, ...]) -> tuple[int, ...]:
    # Order and repeats carry no meaning: sorted and unique, so that two
    # spellings of one setting are the same command (same fingerprint).
    return tuple(sorted(set(values)))


Thresholds: TypeAlias = Annotated[
    tuple[Annotated[int, Field(strict=True, ge=1, le=100)], ...],
    Field(max_length=MAX_THRESHOLDS),
    AfterValidator(_normalized),
]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: True for commands that change state: they must carry a ``message_id``,
    #: and their first outcome is recorded under it.
    changes_state: ClassVar[bool] = True
    #: True for commands only the workers send (``expire_reservations``).
    internal: ClassVar[bool] = False

    @property
    def command_type(self) -> CommandType:
        return CommandType(getattr(self, "type"))  # noqa: B009 - declared by subclasses

    @property
    def key(self) -> str:
        """The id the command is about: its routing key and its lane."""
        raise NotImplementedError

    @property
    def for_group(self) -> bool:
        """True when the command is about a group, not an agent."""
        return False


class _AgentCommand(_Command):
    # Declared first, so that a command's JSON (its fingerprint) starts with it.
    agent_id: AgentId

    @property
    def key(self) -> str:
        return self.agent_id


class _Targeted(_Command):
    """A command about an agent or a group: exactly one of the two ids."""

    agent_id: AgentId | None = None
    group_id: GroupId | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.agent_id is None) == (self.group_id is None):
            raise ValueError("give exactly one of agent_id and group_id")
        return self

    @property
    def key(self) -> str:
        return self.group_id if self.group_id is not None else str(self.agent_id)

    @property
    def for_group(self) -> bool:
        return self.group_id is not None


class RegisterAgent(_AgentCommand):
    type: Literal["register_agent"]
    #: The agent's group (``register_group``); it is charged with the agent.
    group_id: GroupId | None = None


class RegisterGroup(_Command):
    """Create a group under ``parent_id`` (none: a root) if it is new."""

    group_id: GroupId
    type: Literal["register_group"]
    parent_id: GroupId | None = None

    @property
    def key(self) -> str:
        return self.group_id

    @property
    def for_group(self) -> bool:
        return True


class SetGroup(_AgentCommand):
    """Move the agent to ``group_id`` (null: out of every group) from now on."""

    type: Literal["set_group"]
    group_id: GroupId | None


class Allocate(_Targeted):
    type: Literal["allocate"]
    tokens: Tokens


class Consume(_AgentCommand):
    type: Literal["consume"]
    tokens: Tokens


class GetBudget(_Targeted):
    changes_state: ClassVar[bool] = False
    type: Literal["get_budget"]
    consistency: Consistency | None = None


class GetAvailable(_Targeted):
    changes_state: ClassVar[bool] = False
    type: Literal["get_available"]
    consistency: Consistency | None = None


class Reserve(_AgentCommand):
    """Hold ``tokens`` for a call whose cost is not known yet."""

    type: Literal["reserve"]
    tokens: Tokens
    #: Seconds until an unsettled hold expires; the worker's default if absent.
    ttl_seconds: TtlSeconds | None = None


class Commit(_AgentCommand):
    """Settle a hold: ``tokens`` were really used, the rest of the hold is freed."""

    type: Literal["commit"]
    reservation_id: ReservationId
    tokens: UsedTokens


class Release(_AgentCommand):
    """Free a hold unused."""

    type: Literal["release"]
    reservation_id: ReservationId


class SetThresholds(_Targeted):
    """Replace the budget's usage thresholds, in percent of allocated tokens."""

    type: Literal["set_thresholds"]
    thresholds: Thresholds


class SetPeriod(_Targeted):
    """Reset the budget's usage at every ``period`` boundary in ``timezone``
    from the next one on; ``period: null`` removes the period."""

    type: Literal["set_period"]
    period: Period | None
    timezone: TimeZone = "UTC"


class ExpireReservations(_AgentCommand):
    """Expire the agent's overdue holds now, in order with its other commands.

    Sent by the workers' sweeper, not by agents. Not recorded: expiring twice
    is expiring once, so it needs no ``message_id``.
    """

    changes_state: ClassVar[bool] = False
    internal: ClassVar[bool] = True
    type: Literal["expire_reservations"]


Command: TypeAlias = Annotated[
    RegisterAgent
    | RegisterGroup
    | SetGroup
    | Allocate
    | Consume
    | GetBudget
    | GetAvailable
    | Reserve
    | Commit
    | Release
    | SetThresholds
    | SetPeriod
    | ExpireReservations,
    Field(discriminator="type"),
]

COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


def parse_command(body: bytes | str) -> Command:
    """Parse and validate one command body; raises ``pydantic.ValidationError``."""
    return COMMAND_ADAPTER.validate_json(body, strict=True)


def is_committed_query(command: Command) -> bool:
    """A query that asks for the committed state (``budget.queries``)."""
    return (
        isinstance(command, GetBudget | GetAvailable)
        and command.consistency is Consistency.COMMITTED
    )
