import asyncio
import os

from token_budget.client import BudgetClient, InsufficientBudgetError

AMQP_URL = os.environ.get("BUDGET_AMQP_URL", "amqp://guest:guest@localhost/")


async def main() -> None:
    async with BudgetClient.connect(AMQP_URL) as budget:
        await budget.register_agent("agent-7")  # registering again changes nothing
        await budget.allocate("agent-7", 100_000)

        # After each LLM call: fire-and-forget, but never silently lost:
        # returns once the broker confirmed the message, raises otherwise.
        await budget.consume("agent-7", 1_200)  # e.g. usage.total_tokens

        view = await budget.get_budget("agent-7")  # RPC with a timeout
        left = await budget.get_available("agent-7")
        print(f"{view.agent_id}: used {view.used_tokens}, {left} available")

        try:
            await budget.consume_and_wait("agent-7", 10_000_000)  # waits for the worker
        except InsufficientBudgetError as refused:
            print(f"refused: {refused}")


asyncio.run(main())
