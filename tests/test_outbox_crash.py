"""A worker killed after committing a threshold crossing and before publishing it:
its successor publishes the event, once. Real ``python -m worker`` processes."""

import asyncio
from collections.abc import Callable

import pytest
from sqlalchemy import select

from schemas import ThresholdCrossedEvent
from tests.amqp_helpers import Outgoing, command, open_amqp
from tests.db_helpers import reader, wait_until
from tests.processes import WorkerProcess
from worker.tables import outbox

pytestmark = pytest.mark.slow


async def test_an_event_committed_before_a_crash_is_published_once_after_restart(
    worker_process: Callable[..., WorkerProcess], amqp_url: str, database_url: str
) -> None:
    # BUDGET_OUTBOX_PUBLISH=false holds the worker right where a crash can hit
    # it: the crossing committed with its outbox row, the event not yet sent.
    first = worker_process(outbox_publish="false")
    await asyncio.to_thread(first.wait_ready, 60)
    async with open_amqp(amqp_url) as amqp, reader(database_url) as engine:
        events = await amqp.bind_events("budget.threshold.#")
        reply_to, replies = await amqp.reply_queue()
        for kind, tokens in (("register_agent", None), ("allocate", 100), ("consume", 55)):
            await amqp.publish(Outgoing(command(kind, "crash", tokens), "crash",
                                        message_id=f"crash:{kind}", reply_to=reply_to))
        await replies.wait_count(3)

        async def pending() -> list[object]:
            async with engine.connect() as conn:
                return list((await conn.execute(select(outbox.c.published_at))).scalars())

        assert await pending() == [None]  # committed with the change, unpublished
        first.kill()

        second = worker_process()
        await asyncio.to_thread(second.wait_ready, 60)
        [event] = await events.wait_count(1, within=60)
        # A later crossing is published after it: had the first gone out twice,
        # its copy would have arrived before this one.
        await amqp.publish(Outgoing(command("consume", "crash", 30), "crash",
                                    message_id="crash:sentinel"))
        found = await events.wait_for(
            lambda ms: any(m.routing_key == "budget.threshold.80" for m in ms), within=60
        )
        marks = await wait_until(pending, lambda ms: None not in ms, within=30)

    assert [m.routing_key for m in found] == ["budget.threshold.50", "budget.threshold.80"]
    crossed = ThresholdCrossedEvent.model_validate_json(event.body)
    assert event.message_id == crossed.event_id
    assert (crossed.agent_id, crossed.threshold, crossed.used_tokens) == ("crash", 50, 55)
    assert len(marks) == 2 and None not in marks
