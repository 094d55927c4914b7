"""The worker's Prometheus metrics: what each room counts, in one place.

Module-level collectors in prometheus-client's default registry, as its
documentation does it. With ``PROMETHEUS_MULTIPROC_DIR`` set (the supervisor
sets it for its children) each value lives in a file there and the parent
serves their sum; a gauge's ``multiprocess_mode`` says how children combine.
prometheus-client cannot remove a labelled series in that mode, so a
partition this worker stopped holding reads 0, not absent.

Labels are bounded: command types, outcomes and error codes are the wire
enums, lanes and partitions the configured count. No id, URL or user name is
ever a label.
"""

import time

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "BATCH_SECONDS",
    "BATCH_SIZE",
    "BROKER_RECONNECTS",
    "COMMANDS",
    "DEAD_LETTERS",
    "HEALTHY",
    "HEALTH_CHECKED",
    "LANE_UNAPPLIED",
    "NAMES",
    "OUTBOX_BACKLOG",
    "OUTCOME_INVALID",
    "PARTITIONS_HELD",
    "PARTITION_EPOCH",
    "STORAGE_RETRIES",
    "SWEEPS",
    "SWEPT_AGENTS",
    "TYPE_UNKNOWN",
    "report_health",
]

#: ``outcome`` of a delivery dead-lettered before it was a command (bad JSON,
#: a wrong routing key): the wire ``OutcomeKind`` values name every other one.
OUTCOME_INVALID = "invalid"
#: ``type`` of such a delivery: nothing trustworthy names it.
TYPE_UNKNOWN = "unknown"

COMMANDS = Counter(
    "budget_commands",
    "Deliveries settled (acknowledged after their batch committed), by command type and outcome.",
    ["type", "outcome"],
)
BATCH_SECONDS = Histogram(
    "budget_batch_duration_seconds",
    "From a batch taken off the lane to its acknowledgement: decode, apply, commit, answer.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram(
    "budget_batch_size",
    "Deliveries per batch.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 512, 1000, 2000, 5000),
)
LANE_UNAPPLIED = Gauge(
    "budget_lane_unapplied",
    "Deliveries a lane has received and not yet settled (lane: partition, or 'queries').",
    ["lane"],
    multiprocess_mode="livesum",
)
PARTITION_EPOCH = Gauge(
    "budget_partition_epoch",
    "The lease epoch of each partition this worker holds; 0 once it no longer does.",
    ["partition"],
    multiprocess_mode="livemax",
)
PARTITIONS_HELD = Gauge(
    "budget_partitions_held",
    "Partitions whose lanes this worker runs.",
    multiprocess_mode="livesum",
)
OUTBOX_BACKLOG = Gauge(
    "budget_outbox_backlog",
    "Events recorded for this worker's partitions and not yet published.",
    multiprocess_mode="livesum",
)
SWEEPS = Counter("budget_reservation_sweeps", "Sweeps for overdue holds.")
SWEPT_AGENTS = Counter(
    "budget_reservation_sweep_agents",
    "Agents whose lanes a sweep asked to expire overdue holds.",
)
STORAGE_RETRIES = Counter(
    "budget_storage_retries",
    "Batches held and retried because the database was unavailable.",
)
BROKER_RECONNECTS = Counter(
    "budget_broker_reconnects",
    "Broker connections lost (or refused) and retried.",
)
DEAD_LETTERS = Counter(
    "budget_dead_letters",
    "Deliveries dead-lettered to budget.dead, by error code.",
    ["code"],
)
HEALTHY = Gauge(
    "budget_worker_healthy",
    "1 while broker and database are reachable and the worker holds its lanes (/healthz).",
    multiprocess_mode="liveall",
)
HEALTH_CHECKED = Gauge(
    "budget_worker_health_checked_seconds",
    "Unix time of the worker's last health check: a stale one means a stuck process.",
    multiprocess_mode="liveall",
)

#: Every metric family this module exports, as scraped (for docs and tests).
NAMES = frozenset(
    {
        "budget_commands_total",
        "budget_batch_duration_seconds",
        "budget_batch_size",
        "budget_lane_unapplied",
        "budget_partition_epoch",
        "budget_partitions_held",
        "budget_outbox_backlog",
        "budget_reservation_sweeps_total",
        "budget_reservation_sweep_agents_total",
        "budget_storage_retries_total",
        "budget_broker_reconnects_total",
        "budget_dead_letters_total",
        "budget_worker_healthy",
        "budget_worker_health_checked_seconds",
    }
)


def report_health(healthy: bool) -> None:
    HEALTHY.set(1 if healthy else 0)
    HEALTH_CHECKED.set(time.time())
