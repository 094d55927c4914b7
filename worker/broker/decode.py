"""Turn a delivery's body and properties into an Envelope, or say why not."""

from dataclasses import dataclass

from pydantic import ValidationError

from token_budget.schemas import ErrorCode, ValidationIssue, parse_command
from token_budget.worker.domain.outcomes import Envelope

__all__ = ["Invalid", "decode"]

_JSON_TYPES = frozenset({"application/json"})
_ENCODINGS = frozenset({"", "utf-8", "utf8", "identity"})


@dataclass(frozen=True, slots=True)
class Invalid:
    """A delivery that cannot be applied: it is dead-lettered with ``reason``."""

    reason: str
    issues: tuple[ValidationIssue, ...] = ()
    code: ErrorCode = ErrorCode.INVALID_COMMAND


def decode(
    body: bytes,
    *,
    routing_key: str | None,
    message_id: str | None,
    content_type: str | None,
    content_encoding: str | None,
    max_body_bytes: int,
    routed_by_agent: bool = True,
) -> Envelope | Invalid:
    """``routed_by_agent``: the routing key must be the agent_id (every lane);
    ``budget.queries`` is reached by its own name instead."""
    if len(body) > max_body_bytes:
        return Invalid(f"body of {len(body)} bytes exceeds the limit of {max_body_bytes} bytes")
    if content_type and content_type.split(";")[0].strip().lower() not in _JSON_TYPES:
        return Invalid(f"content_type must be application/json, not {content_type!r}")
    if content_encoding and content_encoding.strip().lower() not in _ENCODINGS:
        return Invalid(f"content_encoding {content_encoding!r} is not supported; send UTF-8 JSON")
    try:
        command = parse_command(body)
    except ValidationError as error:
        issues = tuple(
            ValidationIssue(loc=".".join(str(part) for part in item["loc"]), msg=item["msg"])
            for item in error.errors(include_url=False, include_input=False)
        )
        summary = "; ".join(f"{i.loc}: {i.msg}" if i.loc else i.msg for i in issues)
        return Invalid(f"not a valid command: {summary}"[:1000], issues)
    if command.changes_state and not message_id:
        return Invalid(f"a {command.command_type.value} command must carry an AMQP message_id")
    if message_id and not message_id.isprintable():
        # Control characters (NUL above all) are not storable everywhere.
        return Invalid("message_id must not contain control characters")
    if routed_by_agent and routing_key != command.key:
        # Another routing key would put the agent's commands on another lane,
        # out of order with the rest of them.
        field = "group_id" if command.for_group else "agent_id"
        return Invalid(f"routing key {routing_key!r} must equal {field} {command.key!r}")
    return Envelope(command=command, message_id=message_id or None)
