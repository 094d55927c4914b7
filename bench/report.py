"""Ratios against the baselines, the printed table, the JSON file and the chart."""

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["HEADLINES", "format_table", "ratios", "write_chart", "write_json"]

#: The ratios printed last, as the run's summary: (ratio key, what it says).
#: No pass or fail: the README states no speed target, and the machine's
#: load moves every figure.
HEADLINES: list[tuple[str, str]] = [
    ("worker_sqlite_1_vs_do_nothing", "SQLite drain vs do-nothing consumer"),
    ("worker_sqlite_1_vs_naive", "SQLite drain vs naive worker"),
    ("worker_sqlite_default_vs_do_nothing", "budget-worker (default) vs 1 do-nothing"),
    ("worker_postgresql_1_vs_do_nothing", "PostgreSQL drain vs do-nothing consumer"),
    ("rpc_p99_worker_idle_vs_echo_idle", "get_budget p99 vs echo p99, idle"),
    ("rpc_p99_committed_drain_vs_echo_idle", "committed p99, draining, vs idle echo p99"),
    ("rpc_p99_worker_stream_vs_echo_stream", "get_budget p99 vs echo p99, steady stream"),
    ("cpu_per_command_many_vs_few_agents_sqlite", "CPU per command, many vs few agents, SQLite"),
    ("cpu_per_command_many_vs_few_agents_postgresql", "the same, PostgreSQL"),
    ("grouped_vs_ungrouped_sqlite_1", "drain, one shared group vs none, SQLite"),
    ("grouped_vs_ungrouped_postgresql_1", "the same, PostgreSQL"),
    ("rss_large_vs_small", "peak RSS, large vs small backlog"),
]

_WORKER_ROWS = [
    ("sqlite_1", "worker, SQLite, 1 process"),
    ("sqlite_2", "worker, SQLite, 2 processes"),
    ("postgresql_1", "worker, PostgreSQL, 1 process"),
    ("postgresql_2", "worker, PostgreSQL, 2 processes"),
    ("sqlite_default", "budget-worker, SQLite, default"),
    ("postgresql_default", "budget-worker, PostgreSQL, default"),
]
_SHORT = {
    "sqlite_1": "SQLite 1p",
    "sqlite_2": "SQLite 2p",
    "postgresql_1": "PostgreSQL 1p",
    "postgresql_2": "PostgreSQL 2p",
    "sqlite_default": "SQLite default",
    "postgresql_default": "PostgreSQL default",
}


def _ratio(top: Any, bottom: Any) -> float | None:
    if not top or not bottom or any(isinstance(v, float) and math.isnan(v) for v in (top, bottom)):
        return None
    return round(float(top) / float(bottom), 3)


def _baseline(results: dict[str, Any], section: str, key: str) -> dict[str, Any]:
    found = results.get(section, {}).get(key)
    return found if isinstance(found, dict) else {}


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    """Every ratio the run can compute (None where a figure is missing).

    Like with like: a worker row is divided by the do-nothing consumer run in
    as many processes, and by the naive worker on the same database.
    """
    out: dict[str, float | None] = {}
    for key, _ in _WORKER_ROWS:
        kind, processes = key.rsplit("_", 1)
        # The default process count is measured against one do-nothing
        # process: what one command gives, against the simplest consumer.
        limit = _baseline(results, "do_nothing", "1" if processes == "default" else processes)
        naive = _baseline(results, "naive", kind)
        worker = results.get("worker", {}).get(key, {})
        rate = worker.get("msgs_per_s")
        out[f"worker_{key}_vs_do_nothing"] = _ratio(rate, limit.get("msgs_per_s"))
        out[f"worker_{key}_vs_naive"] = _ratio(rate, naive.get("msgs_per_s"))
        # CPU per command against the do-nothing consumer's: the least
        # sensitive to other work on the machine (the broker's CPU is not in it).
        out[f"worker_{key}_cpu_vs_do_nothing_cpu"] = _ratio(
            worker.get("cpu_us_per_msg"), limit.get("cpu_us_per_msg")
        )
    for kind in ("sqlite", "postgresql"):
        out[f"naive_{kind}_vs_do_nothing_1"] = _ratio(
            _baseline(results, "naive", kind).get("msgs_per_s"),
            _baseline(results, "do_nothing", "1").get("msgs_per_s"),
        )
    rpc = results.get("rpc", {})
    for phase in ("idle", "drain"):
        for stat in ("p50", "p99"):
            out[f"rpc_{stat}_worker_{phase}_vs_echo_{phase}"] = _ratio(
                rpc.get(f"worker_{phase}", {}).get(f"{stat}_ms"),
                rpc.get(f"echo_{phase}", {}).get(f"{stat}_ms"),
            )
    for phase in ("idle", "drain"):
        # Both against the idle echo: what a dashboard waits, against the floor.
        out[f"rpc_p99_committed_{phase}_vs_echo_idle"] = _ratio(
            rpc.get(f"committed_{phase}", {}).get("p99_ms"),
            rpc.get("echo_idle", {}).get("p99_ms"),
        )
    out["rpc_p99_worker_stream_vs_echo_stream"] = results.get("stream", {}).get("p99_ratio")
    for kind, scaling in results.get("scaling", {}).items():
        out[f"cpu_per_command_many_vs_few_agents_{kind}"] = scaling.get("cpu_ratio_many_few")
    for kind, groups in results.get("groups", {}).items():
        # Same database, same run: grouped / ungrouped commands per second.
        for processes, point in groups.get("points", {}).items():
            out[f"grouped_vs_ungrouped_{kind}_{processes}"] = point.get("ratio")
    out["rss_large_vs_small"] = results.get("rss", {}).get("ratio_large_small")
    return out


def _f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float | int) and abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(results: dict[str, Any]) -> str:
    lines: list[str] = []
    config = results["config"]
    r = results.get("ratios", {})
    machine = results.get("machine", {})
    lines.append(
        f"{machine.get('cpu_count')} CPU {machine.get('cpu_model')}, "
        f"{machine.get('memory_mib', 0):,} MiB; load average at start "
        f"{machine.get('loadavg_at_start')} (other work skews every figure)"
    )
    versions = results.get("versions", {})
    lines.append(
        ", ".join(f"{k} {versions.get(k)}" for k in ("code", "rabbitmq", "postgresql", "sqlite"))
    )
    lines.append(
        f"Drain of {config['n']:,} consume commands "
        f"({config['partitions']} quorum lanes, prefetch {config['prefetch']}, "
        f"batch_max {config['batch_max']}, {config['agents']} agents)"
    )
    head = f"{'':38}{'seconds':>9}{'msg/s':>9}{'x limit':>9}{'x naive':>9}{'CPU us/msg':>12}  notes"
    lines += [head, "-" * len(head)]
    rows: list[tuple[str, dict[str, Any], Any, Any, str]] = []
    for processes, d in sorted(results.get("do_nothing", {}).items()):
        rows.append(
            (
                f"do-nothing consumer, {processes} process(es)",
                d,
                1.0,
                None,
                f"the limit for {processes}-process rows; publish "
                f"{_f(d.get('publish_msgs_per_s'))}/s",
            )
        )
    for kind, n in sorted(results.get("naive", {}).items()):
        rows.append(
            (
                f"naive worker, {kind}",
                n,
                r.get(f"naive_{kind}_vs_do_nothing_1"),
                1.0,
                f"1 tx + 1 ack per msg, prefetch {n.get('prefetch')}, n {_f(n.get('n'), 0)}",
            )
        )
    for key, label in _WORKER_ROWS:
        w = results.get("worker", {}).get(key)
        if w is None:
            continue
        share = "/".join(f"{p['commands']}" for p in w.get("per_process", []))
        lanes = "/".join(f"{p['lanes']}" for p in w.get("per_process", []))
        note = f"mean batch {_f(w.get('mean_batch'), 1)}, wall {_f(w.get('wall_s'))} s"
        if len(w.get("per_process", [])) > 1:
            note += f"; commands per process {share}, lanes {lanes}"
        rows.append(
            (label, w, r.get(f"worker_{key}_vs_do_nothing"), r.get(f"worker_{key}_vs_naive"), note)
        )
    # Which clock: "seconds" is from the first lane's start to the last batch,
    # by the processes' own log timestamps (the baselines: from the first
    # consumer ready to the last acknowledgement); "wall" from spawn to done.
    for label, data, x_limit, x_naive, note in rows:
        if data.get("loadavg"):
            note += f"; load {data['loadavg'][0]:.1f}"
        lines.append(
            f"{label:38}{_f(data.get('seconds')):>9}{_f(data.get('msgs_per_s'), 0):>9}"
            f"{_f(x_limit):>9}{_f(x_naive):>9}{_f(data.get('cpu_us_per_msg'), 0):>12}  {note}"
        )
    if "rpc" in results:
        rpc = results["rpc"]
        lines += [
            "",
            f"{'RPC latency (sequential calls)':38}{'n':>6}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'max ms':>10}",
            "-" * 72,
        ]
        for key, label in (
            ("echo_idle", "raw aio-pika echo, idle"),
            ("worker_idle", "worker get_budget, idle"),
            ("echo_drain", "echo, while the worker drains"),
            ("worker_drain", "worker get_budget, during a drain"),
            ("committed_idle", "committed get_budget, idle"),
            ("committed_drain", "committed get_budget, during a drain"),
        ):
            s = rpc.get(key, {})
            lines.append(
                f"{label:38}{s.get('n', 0):>6}{_f(s.get('p50_ms')):>9}"
                f"{_f(s.get('p99_ms')):>9}{_f(s.get('max_ms')):>10}"
            )
        lines.append(f"  ({rpc.get('note')}; p99 only from 300 samples on)")
    if "stream" in results:
        stream = results["stream"]
        rate = _f(stream.get("stream_rate_target"), 0)
        lines += [
            "",
            f"Under a steady stream of consumes at {rate}/s"
            f" (a third of the 1-process SQLite drain; {stream.get('stream_sent')} sent)",
        ]
        for key, label in (("echo", "raw aio-pika echo"), ("worker", "worker get_budget")):
            s = stream.get(key, {})
            lines.append(
                f"{label:38}{s.get('n', 0):>6}{_f(s.get('p50_ms')):>9}"
                f"{_f(s.get('p99_ms')):>9}{_f(s.get('max_ms')):>10}"
            )
    if results.get("scaling"):
        lines += [
            "",
            f"{'Cost per command by agent count':38}{'agents':>11}{'msg/s':>9}{'CPU us/msg':>12}",
            "-" * 70,
        ]
        for kind, scaling in sorted(results["scaling"].items()):
            for point in scaling["points"].values():
                lines.append(
                    f"{'one process, ' + kind:38}{point['agents']:>11,}"
                    f"{_f(point['msgs_per_s'], 0):>9}{_f(point['cpu_us_per_msg'], 0):>12}"
                )
    if results.get("groups"):
        lines += [
            "",
            f"{'One shared team under one org':32}{'msg/s: none':>12}{'grouped':>9}{'x':>8}"
            f"{'CPU us/msg':>12}{'mean batch':>12}",
            "-" * 85,
        ]
        for kind, groups in sorted(results["groups"].items()):
            for processes, point in groups["points"].items():
                alone, grouped = point["ungrouped"], point["grouped"]
                pairs = {
                    key: f"{_f(alone[key], 0)}/{_f(grouped[key], 0)}"
                    for key in ("cpu_us_per_msg", "mean_batch")
                }
                lines.append(
                    f"{f'{kind}, {processes} process(es)':32}"
                    f"{_f(alone['msgs_per_s'], 0):>12}{_f(grouped['msgs_per_s'], 0):>9}"
                    f"{_f(point['ratio'], 3):>8}{pairs['cpu_us_per_msg']:>12}"
                    f"{pairs['mean_batch']:>12}"
                )
        sizes = next(iter(results["groups"].values()))
        lines += [
            f"  ({sizes['agents']:,} agents in each set, {sizes['n']:,} consumes per drain; "
            f"the mean of {sizes['rounds']} drain(s) of each set,",
            "  alternating, in one database; each grouped batch locks and updates both group rows)",
        ]
    if "rss" in results:
        lines += [
            "",
            f"{'Worker peak RSS (VmHWM, SQLite)':38}{'backlog':>9}{'MiB':>9}{'at ready':>10}",
            "-" * 66,
        ]
        for point in results["rss"]["points"].values():
            lines.append(
                f"{'':38}{point['backlog']:>9,}{point['vmhwm_kib'] / 1024:>9.1f}"
                f"{(point['vmhwm_ready_kib'] or 0) / 1024:>10.1f}"
            )
    lines += ["", "Ratios measured in this run", "-" * 52]
    for key, label in HEADLINES:
        lines.append(f"{label:42}{_f(r.get(key), 3):>9}")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def write_chart(results: dict[str, Any], path: Path) -> str | None:
    """Draw the PNG; return why not if matplotlib is missing (never fail the run)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart written"
    figure, (drains, latency, memory) = plt.subplots(1, 3, figsize=(16, 5.5))
    labels, rates = [], []
    for processes, d in sorted(results.get("do_nothing", {}).items()):
        labels.append(f"do-nothing {processes}p")
        rates.append(d.get("msgs_per_s") or 0)
    for kind, n in sorted(results.get("naive", {}).items()):
        labels.append(f"naive {kind}")
        rates.append(n.get("msgs_per_s") or 0)
    for key, _ in _WORKER_ROWS:
        if key in results.get("worker", {}):
            labels.append(f"worker {_SHORT[key]}")
            rates.append(results["worker"][key].get("msgs_per_s") or 0)
    drains.barh(labels[::-1], rates[::-1], color="#4c72b0")
    drains.set_xlabel("commands per second")
    drains.set_title(f"Drain of {results['config']['n']:,} consumes")
    rpc = results.get("rpc", {})
    keys = ["echo_idle", "worker_idle", "echo_drain", "worker_drain", "committed_drain"]
    names = ["echo\nidle", "worker\nidle", "echo\ndrain", "worker\ndrain", "committed\ndrain"]
    positions = range(len(keys))
    for offset, stat in ((-0.2, "p50_ms"), (0.2, "p99_ms")):
        values = [rpc.get(k, {}).get(stat) or 0 for k in keys]
        latency.bar([p + offset for p in positions], values, width=0.4, label=stat[:3])
    latency.set_xticks(list(positions), names)
    latency.set_yscale("log")
    latency.set_ylabel("milliseconds (log)")
    latency.set_title("RPC latency")
    latency.legend()
    points = list(results.get("rss", {}).get("points", {}).values())
    memory.bar(
        [f"{p['backlog']:,}" for p in points],
        [p["vmhwm_kib"] / 1024 for p in points],
        color="#55a868",
    )
    memory.set_xlabel("backlog (commands)")
    memory.set_ylabel("peak RSS, MiB")
    memory.set_title("Worker peak RSS (VmHWM)")
    machine = results.get("machine", {})
    figure.suptitle(
        f"token-budget bench — {machine.get('cpu_count')} CPU "
        f"{machine.get('cpu_model')}, {results.get('started_at', '')}"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None
