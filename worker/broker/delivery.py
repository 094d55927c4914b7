"""A delivery as the lane reads it: its properties checked, its body decoded,
and what its reply carries."""

from token_budget.schemas import ErrorBody, ErrorReply, encode_reply
from token_budget.worker.broker.consumer import Delivery
from token_budget.worker.broker.decode import Invalid, decode
from token_budget.worker.broker.wire_guard import has_invalid_text
from token_budget.worker.domain.outcomes import Envelope, Outcome

__all__ = ["can_reply", "decode_delivery", "reply_body"]


def decode_delivery(
    message: Delivery, *, max_body_bytes: int, routed_by_agent: bool = True
) -> Envelope | Invalid:
    """The delivery's command, or why it cannot be applied."""
    for name in _TEXT_PROPERTIES:
        value = getattr(message, name)
        # Absent or ASCII: nearly every property of nearly every delivery.
        if not value or (value.__class__ is str and value.isascii()):
            continue
        if has_invalid_text(value):
            return Invalid(f"property {name} is not valid UTF-8")
    return decode(
        message.body,
        routing_key=message.routing_key,
        message_id=message.message_id,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        max_body_bytes=max_body_bytes,
        routed_by_agent=routed_by_agent,
    )


_TEXT_PROPERTIES = (
    "routing_key",
    "message_id",
    "correlation_id",
    "reply_to",
    "content_type",
    "content_encoding",
    "type",
    "app_id",
    "headers",
)


def can_reply(message: Delivery) -> bool:
    return bool(message.reply_to) and not has_invalid_text(message.reply_to)


def reply_body(result: Outcome | Invalid) -> bytes:
    if isinstance(result, Outcome):
        return result.body
    return encode_reply(
        ErrorReply(
            error=ErrorBody(
                code=result.code,
                message=result.reason,
                errors=list(result.issues) or None,
            )
        )
    )
