"""What becomes of a delivery after its batch (worker/broker/acks.py): tables,
no broker and no database."""

import pytest

from token_budget.schemas import ErrorBody, ErrorCode, ErrorReply, OkReply, Reply, encode_reply
from token_budget.worker.broker.acks import Disposition, Settlement, settle, settle_failure
from token_budget.worker.broker.auth import unauthorized_outcome
from token_budget.worker.broker.decode import Invalid
from token_budget.worker.domain.outcomes import Outcome, OutcomeKind
from token_budget.worker.errors import Fenced, StorageUnavailable, WorkerError
from token_budget.worker.store.batch_store import StaleState


def outcome(kind: OutcomeKind, reply: Reply) -> Outcome:
    return Outcome(kind, reply, encode_reply(reply))


def refused(code: ErrorCode, message: str = "refused") -> ErrorReply:
    return ErrorReply(error=ErrorBody(code=code, message=message))


OK = OkReply(agent_id="a", allocated_tokens=10, used_tokens=4, available_tokens=6)
REASON = "the database refused the command: CHECK constraint failed"

ACK = Settlement(Disposition.ACK)
#: Acknowledged and announced on budget.events: with no reply_to, nobody
#: would hear of the refusal otherwise.
ANNOUNCED = Settlement(Disposition.ACK, event=True)
DEAD_LETTER = Settlement(
    Disposition.DEAD_LETTER, error_code=ErrorCode.DATABASE_REJECTED, reason=REASON
)

#: kind -> (outcome, settled without reply_to, settled with one).
OUTCOMES = {
    "applied": (outcome(OutcomeKind.APPLIED, OK), ACK, ACK),
    "refused": (
        outcome(OutcomeKind.REFUSED, refused(ErrorCode.INSUFFICIENT_BUDGET)),
        ANNOUNCED,
        ACK,
    ),
    # A stored refusal replayed for a redelivery is announced again: the
    # first announcement may have died with the worker that made it.
    "duplicate-refused": (
        outcome(OutcomeKind.DUPLICATE, refused(ErrorCode.AGENT_NOT_FOUND)),
        ANNOUNCED,
        ACK,
    ),
    "duplicate-ok": (outcome(OutcomeKind.DUPLICATE, OK), ACK, ACK),
    "conflict": (outcome(OutcomeKind.CONFLICT, refused(ErrorCode.CONFLICT)), ANNOUNCED, ACK),
    "query": (outcome(OutcomeKind.QUERY, OK), ACK, ACK),
    # A query changes nothing: its refusal is answered, never announced.
    "query_refused": (
        outcome(OutcomeKind.QUERY_REFUSED, refused(ErrorCode.BUDGET_NOT_FOUND)),
        ACK,
        ACK,
    ),
    # The database refused the command even alone: dead-lettered with its reason.
    "rejected": (
        outcome(OutcomeKind.REJECTED, refused(ErrorCode.DATABASE_REJECTED, REASON)),
        DEAD_LETTER,
        DEAD_LETTER,
    ),
    # As worker/broker/auth.py makes it for the lane.
    "unauthorized": (
        unauthorized_outcome(ErrorBody(code=ErrorCode.UNAUTHORIZED, message="not yours")),
        ANNOUNCED,
        ACK,
    ),
}

SETTLE = [
    pytest.param(result, has_reply_to, settled, id=f"{name}-{where}")
    for name, (result, *by_reply_to) in OUTCOMES.items()
    for (has_reply_to, where), settled in zip(
        ((False, "fire_and_forget"), (True, "reply_to")), by_reply_to, strict=True
    )
]


def test_the_table_has_every_outcome_kind() -> None:
    assert {result.kind for result, _, _ in OUTCOMES.values()} == set(OutcomeKind)


@pytest.mark.parametrize(("result", "has_reply_to", "expected"), SETTLE)
def test_a_committed_outcome_is_settled_as_the_table_says(
    result: Outcome, has_reply_to: bool, expected: Settlement
) -> None:
    assert settle(result, has_reply_to=has_reply_to) == expected


@pytest.mark.parametrize("has_reply_to", [False, True], ids=["fire_and_forget", "reply_to"])
@pytest.mark.parametrize(
    "invalid",
    [
        pytest.param(Invalid("not a valid command: Invalid JSON"), id="invalid_command"),
        pytest.param(
            Invalid("agent 'a' belongs to lane 1, not lane 0", code=ErrorCode.WRONG_LANE),
            id="wrong_lane",
        ),
    ],
)
def test_an_invalid_delivery_is_dead_lettered_with_its_code_and_reason(
    invalid: Invalid, has_reply_to: bool
) -> None:
    assert settle(invalid, has_reply_to=has_reply_to) == Settlement(
        Disposition.DEAD_LETTER, error_code=invalid.code, reason=invalid.reason
    )


@pytest.mark.parametrize(
    ("error", "disposition"),
    [
        # The database is away: hold the batch, apply it again after a backoff.
        pytest.param(StorageUnavailable("database is locked"), Disposition.RETRY, id="storage"),
        pytest.param(StaleState("a balance changed"), Disposition.RETRY, id="stale_state"),
        # The lease passed to another worker: the broker gives the batch to it.
        pytest.param(Fenced("lease of partition 2 lost"), Disposition.REQUEUE, id="fenced"),
        # Anything else: back to the broker, whose delivery limit ends a loop.
        pytest.param(WorkerError("another failure"), Disposition.REQUEUE, id="worker_error"),
        pytest.param(RuntimeError("a bug"), Disposition.REQUEUE, id="unexpected"),
    ],
)
def test_a_batch_that_did_not_commit_is_settled_by_its_failure(
    error: BaseException, disposition: Disposition
) -> None:
    assert settle_failure(error) is disposition
