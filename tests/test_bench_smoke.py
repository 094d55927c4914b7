"""The benchmark runs end to end (``python -m bench --quick``); its speed is never checked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config import BenchConfig

_ROOT = Path(__file__).resolve().parent.parent

SECTIONS = ("do_nothing", "naive", "worker", "rpc", "stream", "scaling", "groups", "rss")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_benchmark_writes_every_section(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-5000:]}"
    results = json.loads((tmp_path / "bench.json").read_text())
    missing = [section for section in SECTIONS if not results.get(section)]
    assert not missing, f"sections missing from bench.json: {missing}"
    assert results["errors"] == {}
    assert set(results["worker"]) == {
        f"{kind}_{n}" for kind in ("sqlite", "postgresql") for n in ("1", "2", "default")
    }
    # The worker processes' own logs account for every command of each drain,
    # and each measured section produced its figures.
    n = results["config"]["n"]
    for name, drain in results["worker"].items():
        assert sum(p["commands"] for p in drain["per_process"]) == n, name
        assert drain["msgs_per_s"] > 0, name
    # Like with like: a baseline for every process count and every database.
    assert set(results["do_nothing"]) == {"1", "2"}
    assert set(results["naive"]) == {"sqlite", "postgresql"}
    assert all(n["refused"] == 0 for n in results["naive"].values())
    assert all(d["msgs_per_s"] > 0 for d in results["do_nothing"].values())
    assert results["ratios"]["worker_postgresql_2_vs_do_nothing"] is not None
    assert results["rpc"]["worker_idle"]["n"] == results["config"]["rpc_calls"]
    # A quick run takes 300 calls, the fewest a p99 is reported from.
    assert results["rpc"]["echo_idle"]["p99_ms"] is not None
    assert all(p["vmhwm_kib"] > 0 for p in results["rss"]["points"].values())
    # The shared group's cost: both databases, both sets of agents drained in full.
    assert set(results["groups"]) == {"sqlite", "postgresql"}
    for kind, groups in results["groups"].items():
        for processes, point in groups["points"].items():
            for label in ("ungrouped", "grouped"):
                for each in point[label]["runs"]:
                    drained = sum(p["commands"] for p in each["per_process"])
                    assert drained == n, (kind, processes, label)
            assert point["ratio"] > 0, (kind, processes)
        assert results["ratios"][f"grouped_vs_ungrouped_{kind}_1"] == groups["ratio"]
    # Ratios only: the README states no speed target to fall below.
    assert "Ratios measured in this run" in run.stdout
    assert "TARGET" not in run.stdout.upper()
    assert "targets" not in results


def test_a_quick_run_writes_beside_the_committed_results_never_over_them() -> None:
    quick = BenchConfig.make(n=None, quick=True, out=None)
    full = BenchConfig.make(n=None, quick=False, out=None)
    assert full.out == _ROOT / "bench" / "results"
    assert quick.out == _ROOT / "bench" / "results" / "quick"
    assert "/bench/results/quick/" in (_ROOT / ".gitignore").read_text().splitlines()
