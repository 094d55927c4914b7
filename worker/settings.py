"""Configuration from the environment, every variable prefixed ``BUDGET_``."""

from enum import StrEnum

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas import DEFAULT_MAX_BODY_BYTES

__all__ = ["LogFormat", "Settings"]


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BUDGET_", extra="ignore")

    #: Credentials live in the URLs, hence secrets: never printed, never logged.
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@localhost/")
    database_url: SecretStr = SecretStr("sqlite+aiosqlite:///./budget.db")

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
    #: Backoff cap while the broker or the database is away.
    retry_max_seconds: float = Field(default=10.0, gt=0)
    log_format: LogFormat = LogFormat.AUTO
    log_level: str = "info"
