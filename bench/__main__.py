"""``python -m bench``: run every scenario once, print the table, write the files.

A failing scenario is reported and the others still run; the exit code is 1
if any failed. Each scenario cleans up its own vhost, database and processes.
"""

import argparse
import asyncio
import functools
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .baselines import do_nothing, naive
from .config import DEFAULT_OUT, QUICK_OUT, BenchConfig
from .groups import group_cost
from .infra import RabbitAdmin, machine_info, versions
from .report import format_table, ratios, write_chart, write_json
from .scaling import agents_scaling, rpc_under_stream
from .scenarios import rpc_latency, rss, worker_drain

__all__ = ["SECTIONS", "main"]

SECTIONS = ("do_nothing", "naive", "worker", "rpc", "stream", "scaling", "groups", "rss")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _positive(text: str) -> int:
    value = int(text.replace("_", "").replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="The worker against a do-nothing consumer, a naive worker and an echo RPC, "
        "measured in one run on this machine; results as ratios.",
    )
    parser.add_argument(
        "--n",
        type=_positive,
        default=None,
        help="consume commands per drain (default 100000; 500 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny smoke run (checks that the benchmark works, not speed)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"directory for bench.json and bench.png (default {DEFAULT_OUT}; "
        f"with --quick {QUICK_OUT}, so a smoke run never overwrites the committed results)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="run only these sections",
    )
    args = parser.parse_args(argv)
    config = BenchConfig.make(n=args.n, quick=args.quick, out=args.out)
    # SIGTERM (CI timeouts, `timeout`) cleans up like Ctrl-C: vhosts, databases
    # and worker processes are removed as the scenarios unwind.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return asyncio.run(_run(config, args.only))
    except KeyboardInterrupt:
        _say("interrupted: scenarios cleaned up what they had created")
        return 130


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


async def _run(config: BenchConfig, sections: list[str]) -> int:
    admin = RabbitAdmin()
    started = time.perf_counter()
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": await versions(admin),
        "config": config.as_json(),
    }
    errors: dict[str, str] = {}

    async def step(name: str, run: Callable[[], Awaitable[Any]]) -> Any:
        _say(f"bench: {name} ...")
        began = time.perf_counter()
        try:
            value = await run()
        except Exception as error:
            errors[name] = f"{type(error).__name__}: {error}"
            _say(
                f"bench: {name} FAILED after {time.perf_counter() - began:.1f} s\n"
                f"{traceback.format_exc()}"
            )
            return None
        _say(f"bench: {name} done in {time.perf_counter() - began:.1f} s")
        return value

    if "do_nothing" in sections:
        results["do_nothing"] = {}
        for processes in (1, 2):
            value = await step(
                f"do-nothing consumer, {processes} process(es)",
                functools.partial(do_nothing, config, admin, processes),
            )
            if value is not None:
                results["do_nothing"][str(processes)] = value
    if "naive" in sections:
        results["naive"] = {}
        for kind in ("sqlite", "postgresql"):
            run = functools.partial(naive, config, admin, kind)
            value = await step(f"naive worker, {kind}", run)
            if value is not None:
                results["naive"][kind] = value
    if "worker" in sections:
        results["worker"] = {}
        for kind in ("sqlite", "postgresql"):
            for processes in (1, 2, None):
                name = "default" if processes is None else str(processes)
                value = await step(
                    f"worker drain, {kind}, {name} process(es)",
                    functools.partial(worker_drain, config, admin, kind, processes),
                )
                if value is not None:
                    results["worker"][f"{kind}_{name}"] = value
    if "rpc" in sections:
        results["rpc"] = await step("RPC latency", lambda: rpc_latency(config, admin))
    if "stream" in sections:
        capacity = results.get("worker", {}).get("sqlite_1", {}).get("msgs_per_s")
        results["stream"] = await step(
            "RPC under a steady stream", lambda: rpc_under_stream(config, admin, capacity)
        )
    if "scaling" in sections:
        results["scaling"] = {}
        for kind in ("sqlite", "postgresql"):
            value = await step(
                f"cost per command by agent count, {kind}",
                functools.partial(agents_scaling, config, admin, kind),
            )
            if value is not None:
                results["scaling"][kind] = value
    if "groups" in sections:
        results["groups"] = {}
        for kind in ("sqlite", "postgresql"):
            value = await step(
                f"drain with and without a shared group, {kind}",
                functools.partial(group_cost, config, admin, kind),
            )
            if value is not None:
                results["groups"][kind] = value
    if "rss" in sections:
        results["rss"] = await step("peak RSS", lambda: rss(config, admin))
    results = {key: value for key, value in results.items() if value is not None}
    results["ratios"] = ratios(results)
    results["errors"] = errors
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(format_table(results))
    json_path = config.out / "bench.json"
    write_json(results, json_path)
    print(f"\nwrote {json_path}")
    skipped = write_chart(results, config.out / "bench.png")
    print(skipped or f"wrote {config.out / 'bench.png'}")
    print(f"elapsed {results['elapsed_s']} s")
    if errors:
        print(f"FAILED scenarios: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
