"""A settled batch in the metrics: counted once, after its acknowledgement.

Counted after the ack, not when applied: a batch that fails before it is
requeued and counted when it settles (a redelivered command as
``duplicate``), so the counters agree with what was committed and answered.
"""

from token_budget.worker.broker.decode import Invalid
from token_budget.worker.domain.outcomes import Envelope, Outcome, OutcomeKind
from token_budget.worker.metrics import (
    BATCH_SECONDS,
    BATCH_SIZE,
    COMMANDS,
    DEAD_LETTERS,
    OUTCOME_INVALID,
    TYPE_UNKNOWN,
)

__all__ = ["count_batch"]


def count_batch(
    decoded: list[Envelope | Invalid], results: list[Outcome | Invalid], seconds: float
) -> None:
    counts: dict[tuple[str, str], int] = {}
    for item, result in zip(decoded, results, strict=True):
        kind = item.command.command_type.value if isinstance(item, Envelope) else TYPE_UNKNOWN
        if isinstance(result, Invalid):
            outcome = OUTCOME_INVALID
            DEAD_LETTERS.labels(result.code.value).inc()
        else:
            outcome = result.kind.value
            if result.kind is OutcomeKind.REJECTED and not result.reply.ok:
                DEAD_LETTERS.labels(result.reply.error.code.value).inc()
        counts[kind, outcome] = counts.get((kind, outcome), 0) + 1
    for (kind, outcome), count in counts.items():
        COMMANDS.labels(kind, outcome).inc(count)
    BATCH_SIZE.observe(len(results))
    BATCH_SECONDS.observe(seconds)
