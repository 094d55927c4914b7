"""Configuration from the environment, every variable prefixed ``BUDGET_``."""

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from token_budget.schemas import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_RESERVATION_TTL_SECONDS,
    MAX_RESERVATION_TTL_SECONDS,
)
from token_budget.worker.backoff import RetryPolicy

__all__ = ["AuthMode", "LogFormat", "Settings", "default_database_url"]


class LogFormat(StrEnum):
    """``BUDGET_LOG_FORMAT``: ``auto`` is JSON unless stderr is a terminal."""

    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class AuthMode(StrEnum):
    """Who may send which command (docs/protocol.md, "Authorization")."""

    #: Anyone who can publish to ``budget.commands`` may send any command.
    NONE = "none"
    #: The broker-validated ``user_id`` property decides: an agent's user (the
    #: user named like the agent) may consume and query only its own budget,
    #: only ``admin_users`` may register and allocate, the workers' own user
    #: (of ``amqp_url``) may send internal commands, and a command without
    #: ``user_id`` is refused with ``unauthorized``.
    USER_ID = "user-id"


def default_database_url() -> str:
    """SQLite in the user's data directory, whatever the current directory.

    ``$XDG_DATA_HOME/token-budget/budget.db``, else
    ``~/.local/share/token-budget/budget.db``: the worker and ``budgetctl``
    started anywhere by the same user find the same file. The worker creates
    it on first use; ``budgetctl`` never does.
    """
    data_home = os.environ.get("XDG_DATA_HOME", "")
    # The XDG spec ignores a relative XDG_DATA_HOME, and so do we.
    base = Path(data_home) if os.path.isabs(data_home) else Path.home() / ".local" / "share"
    return f"sqlite+aiosqlite:///{base / 'token-budget' / 'budget.db'}"


class Settings(BaseSettings):
    """The worker's configuration, from ``BUDGET_*`` variables; URLs are secrets.

    Validated once at start: a bad value stops the worker with the variable's
    name rather than failing later.
    """

    model_config = SettingsConfigDict(env_prefix="BUDGET_", extra="ignore")

    #: Credentials live in the URLs, hence secrets: never printed, never logged.
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost/")
    database_url: SecretStr = Field(default_factory=lambda: SecretStr(default_database_url()))

    #: Number of lane queues. Fixed for the life of a deployment: changing it
    #: moves agents to other lanes (see docs/operations.md).
    partitions: int = Field(default=16, ge=1, le=1024)
    #: Deliveries a lane may hold unacknowledged; bounds memory per lane.
    prefetch: int = Field(default=512, ge=1, le=65535)
    #: Most commands applied in one database transaction.
    batch_max: int = Field(default=512, ge=1, le=10000)
    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=256)
    #: Quorum-queue delivery limit: a message that keeps killing its consumer
    #: is dead-lettered by the broker after this many returns.
    delivery_limit: int = Field(default=20, ge=1)
    #: AMQP heartbeat in seconds: how fast a frozen worker's lanes move on.
    heartbeat: int = Field(default=15, ge=1, le=600)
    #: Pool timing (seconds). A worker that stops beating for ``member_ttl``
    #: leaves the pool; its leases can be taken ``lease_ttl`` after its last
    #: renewal. Together with ``heartbeat`` these bound failover (docs/pool.md).
    lease_ttl: float = Field(default=10.0, gt=0)
    member_ttl: float = Field(default=10.0, gt=0)
    renew_interval: float = Field(default=2.0, gt=0)
    migrate_on_start: bool = True
    db_pool_size: int = Field(default=5, ge=1, le=100)
    #: ``BUDGET_PROCESSES``: worker processes ``budget-worker`` runs (one per
    #: CPU when unset); they share the lanes through the pool like workers on
    #: several hosts. 1: this process is the worker, no supervisor.
    processes: int | None = Field(default=None, ge=1, le=256)
    #: Backoff of every retry loop (lanes, pool, outbox, sweeper, start-up,
    #: reconnects) while the broker or the database is away: the first
    #: delay, doubled on every failure up to the cap.
    retry_initial_seconds: float = Field(default=0.1, gt=0)
    retry_max_seconds: float = Field(default=10.0, gt=0)
    #: ``BUDGET_AUTH``: ``none`` (default) or ``user-id``. Set it the same on
    #: every worker: each applies its own policy to the lanes it holds.
    auth: AuthMode = AuthMode.NONE
    #: ``BUDGET_ADMIN_USERS``, comma-separated broker user names (``ops,billing``)
    #: that may send every command in ``user-id`` mode. Give no user that may
    #: publish commands RabbitMQ's ``impersonator`` tag: it could forge any
    #: ``user_id``, an admin's included.
    admin_users: Annotated[list[str], NoDecode] = Field(default_factory=list)
    #: ``BUDGET_RESERVATION_TTL``: seconds a hold lives when ``reserve`` names none.
    reservation_ttl: int = Field(
        default=DEFAULT_RESERVATION_TTL_SECONDS, ge=1, le=MAX_RESERVATION_TTL_SECONDS
    )
    #: How often each worker looks for overdue holds and asks their lanes to
    #: expire them (an agent's own next command expires them anyway).
    reservation_sweep_interval: float = Field(default=5.0, gt=0)
    #: Publish recorded events (threshold crossings). ``false`` keeps them in
    #: the outbox table until a worker with ``true`` holds their partition:
    #: for maintenance and fault-injection tests, never needed otherwise.
    outbox_publish: bool = True
    #: How often the outbox is polled besides the wake-up after each commit.
    outbox_poll_interval: float = Field(default=1.0, gt=0)
    #: ``BUDGET_LOG_HEARTBEAT_SECONDS``: how often the worker logs ``worker_heartbeat``
    #: (lanes held, commands since the last one). Not ``heartbeat``, the AMQP one.
    log_heartbeat_seconds: float = Field(default=60.0, gt=0)
    log_format: LogFormat = LogFormat.AUTO
    log_level: str = "info"
    #: ``BUDGET_METRICS_PORT``: serve ``GET /metrics`` (Prometheus) and
    #: ``GET /healthz`` on this port; unset (default): no HTTP at all. With
    #: ``--processes N`` the parent serves it, summing its children.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    #: ``BUDGET_METRICS_HOST``: the address it listens on (all by default, for a scraper
    #: in another container; ``127.0.0.1`` keeps it on the host).
    metrics_host: str = "0.0.0.0"  # noqa: S104 - opt-in, and meant to be scraped
    #: How often the worker re-checks its own health (what ``/healthz`` says).
    health_interval: float = Field(default=2.0, gt=0)

    @property
    def health_stale_after(self) -> float:
        """Seconds after which a health check no longer counts (``/healthz``: stuck)."""
        return max(3 * self.health_interval, 10.0)

    @property
    def retry(self) -> RetryPolicy:
        """The one backoff policy of every retry loop."""
        return RetryPolicy(self.retry_initial_seconds, self.retry_max_seconds)

    @field_validator("admin_users", mode="before")
    @classmethod
    def _split_users(cls, value: Any) -> Any:
        # The environment gives one string; a list passes through as is.
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return value
