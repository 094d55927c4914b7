"""The root of the worker's infrastructure errors, beside the domain's ``BudgetError``.

``BudgetError`` (domain/errors.py) is a command refused by the rules: an
outcome, answered with its wire code. A ``WorkerError`` is the machinery
failing (broker, database, configuration): never answered as a refusal, but
acted on (retry, requeue, stop, exit). Each has a stable ``code`` for logs.
"""

from pathlib import Path
from typing import ClassVar

__all__ = [
    "PLUGIN_HINT",
    "BrokerRefused",
    "Fenced",
    "NoDatabase",
    "PluginMissing",
    "StorageUnavailable",
    "TopologyError",
    "ViewError",
    "WorkerError",
]

PLUGIN_HINT = (
    "RabbitMQ has no x-modulus-hash exchange type: before RabbitMQ 4.3 it comes with "
    "the sharding plugin. Enable it on every broker node with:  "
    "rabbitmq-plugins enable rabbitmq_sharding"
)


class WorkerError(Exception):
    """Something the worker depends on failed; ``code`` says what, for machines."""

    code: ClassVar[str] = "worker_error"


class StorageUnavailable(WorkerError):
    """The database cannot take the batch now (outage, lock, stale read).

    The same batch may succeed later: hold it, back off, retry. Never a
    reason to dead-letter or acknowledge.
    """

    code = "storage_unavailable"


class Fenced(WorkerError):
    """The lane's lease has passed to another worker: commit nothing, stop the lane.

    Always raised, never returned: the service reports a lost lease per
    request as ``store.service.FenceLost`` and the caller raises this.
    """

    code = "fenced"


class TopologyError(WorkerError):
    """The broker refused the topology; the worker cannot start."""

    code = "topology"


class PluginMissing(TopologyError):
    """The broker lacks the x-modulus-hash exchange type (rabbitmq_sharding)."""

    code = "plugin_missing"

    def __init__(self) -> None:
        super().__init__(PLUGIN_HINT)


class BrokerRefused(WorkerError):
    """The broker refused the worker's login at start: configuration, not an
    outage, so the worker exits (code 1) instead of retrying for ever."""

    code = "broker_refused"


class ViewError(WorkerError):
    """The database could not be read (unreachable, or not migrated)."""

    code = "view_failed"


class NoDatabase(ViewError):
    """The SQLite file is not there: opening it would create an empty one."""

    code = "no_database"

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"no database at {path}: start the worker first "
            "or pass --database-url/BUDGET_DATABASE_URL"
        )
