"""The one log line per batch: ``batch_applied``."""

from typing import Any

from structlog.typing import FilteringBoundLogger

from token_budget.worker.broker.consumer import Delivery
from token_budget.worker.broker.decode import Invalid
from token_budget.worker.domain.outcomes import Envelope, Outcome

__all__ = ["log_batch"]


def log_batch(
    log: FilteringBoundLogger,
    batch: list[Delivery],
    decoded: list[Envelope | Invalid],
    results: list[Outcome | Invalid],
    seconds: float,
    log_ops: bool,
) -> None:
    # One line per batch: a summary people can read, and (``log_ops``)
    # every operation as a compact [message_id, agent, type, tokens,
    # outcome]: a line per command would cost more than applying it.
    ops = []
    agents = set()
    counts: dict[str, int] = {}
    for message, item, result in zip(batch, decoded, results, strict=True):
        if isinstance(result, Invalid):
            kind = outcome = "dead_lettered"
            log.warning(
                "command_dead_lettered", message_id=message.message_id, reason=result.reason
            )
        else:
            kind = outcome = result.kind.value
            if not result.reply.ok:
                outcome = f"{kind}:{result.reply.error.code}"
        counts[kind] = counts.get(kind, 0) + 1
        if isinstance(item, Envelope):
            agents.add(item.command.key)
        if log_ops and isinstance(item, Envelope):
            command = item.command
            tokens = getattr(command, "tokens", None)
            ops.append((item.message_id, command.key, command.type, tokens, outcome))
    summary: dict[str, Any] = {
        "size": len(batch),
        "agents": len(agents),
        "outcomes": counts,
        "duration_ms": round(seconds * 1000, 3),
    }
    if log_ops:
        summary["ops"] = ops
    log.info("batch_applied", **summary)
