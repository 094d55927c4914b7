"""What the worker's log says to people and to machines: a summary per batch,
the exact per-command record in JSON, and a heartbeat while idle."""

from collections.abc import Callable

from tests.amqp_helpers import connection_name
from tests.eventually import eventually
from tests.processes import WorkerProcess
from tests.support import funded
from token_budget.client import BudgetClient


def _events(process: WorkerProcess, name: str) -> list[dict[str, object]]:
    return [e for e in process.events() if e.get("event") == name]


async def test_batch_applied_in_json_summarises_and_keeps_every_command(
    worker_process: Callable[..., WorkerProcess], amqp_url: str
) -> None:
    process = worker_process()
    await process.wait_ready()
    async with BudgetClient.connect(amqp_url, timeout=20, name=connection_name()) as client:
        agent = await funded(client, 100)
        await client.consume_and_wait(agent, 7, message_id=f"{agent}-c1")
    await eventually(
        lambda: any(f"{agent}-c1" in str(e.get("ops")) for e in _events(process, "batch_applied")),
        within=30,
        what="the consume in a batch_applied line",
    )
    (line,) = [e for e in _events(process, "batch_applied") if f"{agent}-c1" in str(e["ops"])]
    assert line["ops"] == [[f"{agent}-c1", agent, "consume", 7, "applied"]]
    assert (line["size"], line["agents"], line["outcomes"]) == (1, 1, {"applied": 1})
    assert isinstance(line["duration_ms"], float)


async def test_batch_applied_in_a_console_at_info_is_a_summary_without_the_commands(
    worker_process: Callable[..., WorkerProcess], amqp_url: str
) -> None:
    process = worker_process(log_format="console", log_level="info")
    await eventually(
        lambda: any("worker_ready" in str(e) for e in process.events()),
        within=60,
        what="worker_ready",
    )
    async with BudgetClient.connect(amqp_url, timeout=20, name=connection_name()) as client:
        agent = await funded(client, 100)
        await client.consume_and_wait(agent, 7, message_id=f"{agent}-c1")
    lines = await eventually(
        lambda: [str(e["line"]) for e in process.events() if "batch_applied" in str(e)],
        within=30,
        what="batch_applied lines",
        done=lambda found: len(found) >= 3,
    )
    assert all("agents=" in line and "outcomes=" in line for line in lines), lines
    assert not any(f"{agent}-c1" in line or "ops=" in line for line in lines), lines


async def test_an_idle_worker_logs_a_heartbeat_with_its_lanes_and_commands(
    worker_process: Callable[..., WorkerProcess], amqp_url: str
) -> None:
    process = worker_process(log_heartbeat_seconds=0.5)
    await process.wait_ready()
    async with BudgetClient.connect(amqp_url, timeout=20, name=connection_name()) as client:
        await funded(client, 100)  # two commands
    beats = await eventually(
        lambda: _events(process, "worker_heartbeat"),
        within=30,
        what="heartbeats counting both commands",
        done=lambda found: sum(int(str(b["commands"])) for b in found) >= 2,
    )
    assert beats[-1]["lanes"] == [0, 1, 2, 3]
    assert beats[-1]["interval_s"] == 0.5
    # Each line counts only what came since the one before: never more than sent.
    assert sum(int(str(b["commands"])) for b in beats) == 2
