"""Commands agents publish to ``budget.commands``.

Validation is strict on purpose: a string, float or boolean where an integer
belongs, an unknown field or an unknown ``type`` is refused, so that a typo in
a producer never passes silently.
"""

from enum import StrEnum
from typing import Annotated, ClassVar, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from .limits import AGENT_ID_MAX_LENGTH, AGENT_ID_PATTERN, MAX_TOKENS

__all__ = [
    "COMMAND_ADAPTER",
    "AgentId",
    "Allocate",
    "Command",
    "CommandType",
    "Consume",
    "GetAvailable",
    "GetBudget",
    "RegisterAgent",
    "Tokens",
    "parse_command",
]


class CommandType(StrEnum):
    REGISTER_AGENT = "register_agent"
    ALLOCATE = "allocate"
    CONSUME = "consume"
    GET_BUDGET = "get_budget"
    GET_AVAILABLE = "get_available"


AgentId: TypeAlias = Annotated[
    str,
    StringConstraints(
        strict=True, min_length=1, max_length=AGENT_ID_MAX_LENGTH, pattern=AGENT_ID_PATTERN
    ),
]
Tokens: TypeAlias = Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS)]


class _Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    #: True for commands that change state: they must carry a ``message_id``.
    changes_state: ClassVar[bool] = True

    agent_id: AgentId

    @property
    def command_type(self) -> CommandType:
        return CommandType(getattr(self, "type"))  # noqa: B009 - declared by subclasses


class RegisterAgent(_Command):
    type: Literal["register_agent"]


class Allocate(_Command):
    type: Literal["allocate"]
    tokens: Tokens


class Consume(_Command):
    type: Literal["consume"]
    tokens: Tokens


class GetBudget(_Command):
    changes_state: ClassVar[bool] = False
    type: Literal["get_budget"]


class GetAvailable(_Command):
    changes_state: ClassVar[bool] = False
    type: Literal["get_available"]


Command: TypeAlias = Annotated[
    RegisterAgent | Allocate | Consume | GetBudget | GetAvailable,
    Field(discriminator="type"),
]

COMMAND_ADAPTER: TypeAdapter[Command] = TypeAdapter(Command)


def parse_command(body: bytes | str) -> Command:
    """Parse and validate one command body; raises ``pydantic.ValidationError``."""
    return COMMAND_ADAPTER.validate_json(body, strict=True)
