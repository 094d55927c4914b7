import asyncio
import os

from token_budget.client import BudgetClient

AMQP_URL = os.environ.get("BUDGET_AMQP_URL", "amqp://guest:guest@localhost/")


async def call_llm(prompt: str, max_tokens: int) -> int:
    """A stand-in for your LLM call: returns the tokens it used."""
    return min(len(prompt.split()) * 100, max_tokens)


async def main() -> None:
    async with BudgetClient.connect(AMQP_URL) as budget:
        await budget.register_agent("agent-8")
        await budget.allocate("agent-8", 100_000)

        async with budget.reservation("agent-8", max_tokens=8_000) as hold:
            used = await call_llm("summarise the quarterly report", max_tokens=8_000)
            hold.used(used)  # commits this, frees the rest of the hold

        # Without hold.used(), leaving the block commits the WHOLE hold.
        async with budget.reservation("agent-8", max_tokens=2_000):
            await call_llm("a call whose usage is not reported", max_tokens=2_000)

        view = await budget.get_budget("agent-8")
        print(f"{view.agent_id}: used {view.used_tokens}, {view.available_tokens} available")


asyncio.run(main())
