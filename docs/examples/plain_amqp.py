"""Talk to the budget worker with a plain AMQP client and docs/protocol.md only.

Nothing of this project is imported: the script is what an agent written in
any language does. It registers ``--agent``, allocates, consumes, is refused,
retries the refusal with the same message_id, and queries; it prints every
reply as ``<step> <reply JSON>`` and exits 1 as soon as a reply differs from
what docs/protocol.md promises (2 if no reply comes in time).

    python docs/examples/plain_amqp.py --amqp-url amqp://guest:guest@localhost/ --agent a-1
"""

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

COMMANDS_EXCHANGE = "budget.commands"  # the only broker name a producer needs
DUPLICATE_HEADER = "x-budget-duplicate"


class Mismatch(Exception):
    """A reply that is not what docs/protocol.md says it must be."""


class Agent:
    """One connection, one confirming channel, one exclusive reply queue."""

    def __init__(self, amqp_url: str, agent_id: str, reply_seconds: float) -> None:
        self.amqp_url = amqp_url
        self.agent_id = agent_id
        self.reply_seconds = reply_seconds
        self._pending: dict[str, asyncio.Future[AbstractIncomingMessage]] = {}

    async def __aenter__(self) -> "Agent":
        self.connection = await aio_pika.connect(self.amqp_url)
        # Confirms + mandatory: a publish that no lane takes raises instead of vanishing.
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        self.exchange = await channel.get_exchange(COMMANDS_EXCHANGE, ensure=False)
        self.replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        await self.replies.consume(self._on_reply, no_ack=True)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message)

    async def call(self, command: dict[str, Any], message_id: str | None) -> tuple[Any, bool]:
        """Publish ``command`` and return (reply body, whether it is a duplicate)."""
        correlation_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        message = aio_pika.Message(
            json.dumps(command).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            # aio-pika invents a random message_id when none is given: that is
            # harmless for queries only, never for state-changing commands.
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=self.replies.name,
        )
        await self.exchange.publish(message, routing_key=command["agent_id"], mandatory=True)
        reply = await asyncio.wait_for(future, self.reply_seconds)
        if reply.content_type != "application/json":
            raise Mismatch(f"reply content_type is {reply.content_type!r}")
        duplicate = (reply.headers or {}).get(DUPLICATE_HEADER) is True
        return json.loads(reply.body), duplicate


def expect(step: str, actual: Any, expected: Any) -> None:
    if actual != expected:
        raise Mismatch(f"{step}: expected {expected!r}, got {actual!r}")


def budget(agent_id: str, allocated: int, used: int) -> dict[str, Any]:
    """The success reply every command gets (docs/protocol.md, Replies)."""
    return {
        "ok": True,
        "agent_id": agent_id,
        "allocated_tokens": allocated,
        "used_tokens": used,
        "reserved_tokens": 0,
        "available_tokens": allocated - used,
    }


async def run(amqp_url: str, agent_id: str, reply_seconds: float) -> None:
    async with Agent(amqp_url, agent_id, reply_seconds) as agent:

        async def step(name: str, command: dict[str, Any], message_id: str | None) -> Any:
            reply, duplicate = await agent.call(command, message_id)
            print(name, json.dumps(reply), flush=True)
            if duplicate != name.endswith("_retry"):
                raise Mismatch(f"{name}: {DUPLICATE_HEADER} is {duplicate}")
            return reply

        def new_id() -> str:
            return uuid.uuid4().hex

        register = {"type": "register_agent", "agent_id": agent_id}
        reply = await step("register_agent", register, new_id())
        # A new agent has no budget yet: its token fields are null.
        allocated, used = reply.get("allocated_tokens"), reply.get("used_tokens")
        if allocated is None:
            no_budget = dict.fromkeys(
                ("allocated_tokens", "used_tokens", "reserved_tokens", "available_tokens")
            )
            expect("register_agent", reply, {"ok": True, "agent_id": agent_id, **no_budget})
            allocated, used = 0, 0
        else:  # registered before: the reply shows its budget
            expect("register_agent", reply, budget(agent_id, allocated, used))

        allocate = {"type": "allocate", "agent_id": agent_id, "tokens": 100}
        reply = await step("allocate", allocate, new_id())
        allocated += 100
        expect("allocate", reply, budget(agent_id, allocated, used))

        consume = {"type": "consume", "agent_id": agent_id, "tokens": 30}
        reply = await step("consume", consume, new_id())
        used += 30
        expect("consume", reply, budget(agent_id, allocated, used))

        available = allocated - used
        too_much = {"type": "consume", "agent_id": agent_id, "tokens": available + 1}
        refused_id = new_id()
        refusal = await step("consume_refused", too_much, refused_id)
        expect("consume_refused", refusal.get("ok"), False)
        error = refusal.get("error", {})
        expect("consume_refused", error.get("code"), "insufficient_budget")
        expect("consume_refused", error.get("requested_tokens"), available + 1)
        expect("consume_refused", error.get("available_tokens"), available)

        # A retry with the same message_id answers the first outcome again.
        reply = await step("consume_refused_retry", too_much, refused_id)
        expect("consume_refused_retry", reply, refusal)

        # Queries need no message_id and are never recorded.
        reply = await step("get_budget", {"type": "get_budget", "agent_id": agent_id}, None)
        expect("get_budget", reply, budget(agent_id, allocated, used))
        query = {"type": "get_available", "agent_id": agent_id}
        reply = await step("get_available", query, None)
        expect("get_available", reply, budget(agent_id, allocated, used))
        expect("get_available", reply["available_tokens"], available)
    print("all replies match docs/protocol.md", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", required=True, help="e.g. amqp://guest:guest@localhost/")
    parser.add_argument("--agent", required=True, help="agent id, e.g. agent-1")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait per reply")
    args = parser.parse_args()
    try:
        asyncio.run(run(args.amqp_url, args.agent, args.timeout))
    except Mismatch as error:
        print(f"MISMATCH {error}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"TIMEOUT no reply within {args.timeout} s", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
