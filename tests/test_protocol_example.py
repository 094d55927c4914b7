"""docs/examples/plain_amqp.py, which knows only aio-pika and docs/protocol.md,
gets from the running worker exactly the replies the document promises."""

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from tests.amqp_helpers import connect
from tests.support import unique
from token_budget.worker.app import Worker
from token_budget.worker.broker.topology import TopologySpec, declare_topology

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "examples" / "plain_amqp.py"


async def run_example(amqp_url: str, agent: str, *extra: str) -> tuple[int, str, str]:
    # A subprocess, not a thread: the in-process worker shares this event loop.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        "--amqp-url",
        amqp_url,
        "--agent",
        agent,
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def replies(stdout: str) -> dict[str, Any]:
    """``<step> <reply JSON>`` lines, by step."""
    found = {}
    for line in stdout.splitlines():
        step, _, body = line.partition(" ")
        if body.startswith("{"):
            found[step] = json.loads(body)
    return found


async def test_plain_amqp_client_gets_the_documented_replies(worker: Worker, amqp_url: str) -> None:
    agent = unique("plain")
    code, out, err = await run_example(amqp_url, agent)

    assert code == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert out.splitlines()[-1] == "all replies match docs/protocol.md"
    got = replies(out)
    assert list(got) == [
        "register_agent",
        "allocate",
        "consume",
        "consume_refused",
        "consume_refused_retry",
        "get_budget",
        "get_available",
    ]
    assert got["register_agent"] == {
        "ok": True,
        "agent_id": agent,
        "allocated_tokens": None,
        "used_tokens": None,
        "reserved_tokens": None,
        "available_tokens": None,
    }
    budget = {
        "ok": True,
        "agent_id": agent,
        "allocated_tokens": 100,
        "used_tokens": 30,
        "reserved_tokens": 0,
        "available_tokens": 70,
    }
    assert got["allocate"] == {**budget, "used_tokens": 0, "available_tokens": 100}
    assert got["consume"] == budget
    error = got["consume_refused"]["error"]
    assert (error["code"], error["requested_tokens"], error["available_tokens"]) == (
        "insufficient_budget",
        71,
        70,
    )
    assert got["consume_refused_retry"] == got["consume_refused"]
    assert got["get_budget"] == got["get_available"] == budget


async def test_plain_amqp_client_fails_when_no_worker_answers(amqp_url: str) -> None:
    connection = await connect(amqp_url)
    try:
        await declare_topology(connection, TopologySpec(partitions=2, delivery_limit=20))
    finally:
        await connection.close()

    code, out, err = await run_example(amqp_url, unique("plain"), "--timeout", "1")

    assert code == 2, f"stdout:\n{out}\nstderr:\n{err}"
    assert "TIMEOUT" in err
    assert "all replies match" not in out
