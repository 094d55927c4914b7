import asyncio
import os

from token_budget.client import BudgetClient

AMQP_URL = os.environ.get("BUDGET_AMQP_URL", "amqp://guest:guest@localhost/")


async def main() -> None:
    async with BudgetClient.connect(AMQP_URL) as budget:
        await budget.register_agent("agent-9")
        await budget.allocate("agent-9", 50_000)  # from now on: the allowance of each day

        # Usage so far stays; it goes back to 0 at every midnight in Berlin.
        view = await budget.set_period("agent-9", "day", timezone="Europe/Berlin")
        assert view.resets_at is not None
        print(f"{view.agent_id}: {view.available_tokens} available until {view.resets_at:%H:%M}")


asyncio.run(main())
