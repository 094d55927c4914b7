import asyncio
import os

import litellm

from token_budget.client import BudgetClient, usage_from
from token_budget.client.litellm import BudgetCallback

AMQP_URL = os.environ.get("BUDGET_AMQP_URL", "amqp://guest:guest@localhost/")
# mock_response: LiteLLM answers by itself (no provider, no key); drop it for real calls.
HELLO = {"messages": [{"role": "user", "content": "Say hello"}], "mock_response": "Hello!"}


async def main() -> None:
    async with BudgetClient.connect(AMQP_URL) as budget:
        await budget.register_agent("agent-10")
        await budget.allocate("agent-10", 100_000)

        # Hold before the call, commit what its response says it used.
        async with budget.reservation("agent-10", max_tokens=4_000) as hold:
            response = await litellm.acompletion(model="gpt-4o-mini", **HELLO)
            first = hold.used_from(response)  # prompt + completion, cached counted once

        # Or charge every LiteLLM call, streamed ones too, with a callback.
        litellm.callbacks = [BudgetCallback(budget, "agent-10")]
        stream = await litellm.acompletion(
            model="gpt-4o-mini", stream=True, stream_options={"include_usage": True}, **HELLO
        )
        second = usage_from([chunk async for chunk in stream])

        view = await budget.get_budget("agent-10")
        while view.used_tokens < first.tokens + second.tokens:  # the callback's consume is async
            view = await budget.get_budget("agent-10")
        print(f"{view.agent_id}: used {view.used_tokens} = {first.tokens} + {second.tokens}")


asyncio.run(main())
