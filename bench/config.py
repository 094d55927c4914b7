"""What one run measures: sizes, and the worker settings the baselines copy."""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from token_budget.worker.settings import Settings

__all__ = ["DEFAULT_OUT", "QUICK_OUT", "BenchConfig"]

#: The committed results of a full run.
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
#: A smoke run's (gitignored): it never overwrites the committed results.
QUICK_OUT = DEFAULT_OUT / "quick"


@dataclass(frozen=True, slots=True)
class BenchConfig:
    #: Consume commands in every drain (do-nothing, naive, worker scenarios).
    n: int
    #: Consume commands the naive worker drains: at a few hundred a second its
    #: rate does not depend on the backlog, and 100,000 would take many minutes.
    naive_n: int
    #: Agents the commands are spread over (the routing key spreads them over lanes).
    agents: int
    #: Agents for the per-command cost figure: few, then very many (bulk-loaded).
    agent_counts: tuple[int, int]
    #: Worker processes for the shared-group figure, and how many drains of each
    #: set of agents per process count (alternating, so drift cancels).
    group_processes: tuple[int, ...]
    group_rounds: int
    #: Backlogs for the peak-RSS measurement: small, then large.
    rss_backlogs: tuple[int, int]
    #: Sequential get_budget / echo calls measured while idle.
    rpc_calls: int
    #: Concurrent get_budget callers while a backlog drains.
    rpc_drain_callers: int
    #: The worker's own settings (BUDGET_* environment), copied by the baselines.
    partitions: int
    prefetch: int
    batch_max: int
    delivery_limit: int
    out: Path
    quick: bool

    @classmethod
    def make(cls, *, n: int | None, quick: bool, out: Path | None) -> "BenchConfig":
        settings = Settings()
        return cls(
            n=n if n is not None else (500 if quick else 100_000),
            naive_n=min(n if n is not None else 100_000, 500 if quick else 20_000),
            agents=20 if quick else 1_000,
            agent_counts=(20, 2_000) if quick else (1_000, 1_000_000),
            group_processes=(1,) if quick else (1, 2),
            group_rounds=1 if quick else 2,
            rss_backlogs=(1_000, 2_000) if quick else (10_000, 100_000),
            rpc_calls=300 if quick else 500,  # 300: the fewest samples for a p99
            rpc_drain_callers=4 if quick else 8,
            partitions=settings.partitions,
            prefetch=settings.prefetch,
            batch_max=settings.batch_max,
            delivery_limit=settings.delivery_limit,
            out=out if out is not None else (QUICK_OUT if quick else DEFAULT_OUT),
            quick=quick,
        )

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["rss_backlogs"] = list(self.rss_backlogs)
        data["agent_counts"] = list(self.agent_counts)
        data["group_processes"] = list(self.group_processes)
        return data
