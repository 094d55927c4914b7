"""Group budgets in the SDK: org → team → agent, every level charged with the agent.

    await client.register_group("org")
    await client.register_group("team-a", parent_id="org")
    await client.allocate_group("org", 1_000_000)
    await client.register_agent("agent-7", group_id="team-a")

A group without an allocation limits nobody. A consume, reserve or commit
of a member is refused with ``InsufficientBudgetError`` whose ``limited_by``
names the first level, from the agent upward, that lacked room.
"""

from collections.abc import Iterable

from token_budget.schemas import (
    Allocate,
    BudgetView,
    Command,
    Consistency,
    GetAvailable,
    GetBudget,
    OkReply,
    Period,
    RegisterGroup,
    SetGroup,
    SetPeriod,
    SetThresholds,
)

__all__ = ["GroupCommands"]


class GroupCommands:
    """The group commands of ``BudgetClient``: each reply is the group's budget
    (``group_id`` set, no ``agent_id``), but ``set_group``'s, the agent's."""

    async def request(
        self,
        command: Command,
        *,
        message_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the client's signature
    ) -> OkReply:
        raise NotImplementedError  # BudgetClient.request

    async def register_group(
        self, group_id: str, *, parent_id: str | None = None, message_id: str | None = None
    ) -> BudgetView:
        """Create the group under ``parent_id`` (none: a root); again with the
        same parent changes nothing, with another one is a ``ConflictError``."""
        command = RegisterGroup(type="register_group", group_id=group_id, parent_id=parent_id)
        return (await self.request(command, message_id=message_id)).view()

    async def set_group(
        self, agent_id: str, group_id: str | None, *, message_id: str | None = None
    ) -> BudgetView:
        """Move the agent to ``group_id`` (None: out of every group) from now on;
        past usage stays with the old groups. ``HoldsOpenError`` while the
        agent holds reservations: settle them first."""
        command = SetGroup(type="set_group", agent_id=agent_id, group_id=group_id)
        return (await self.request(command, message_id=message_id)).view()

    async def allocate_group(
        self, group_id: str, tokens: int, *, message_id: str | None = None
    ) -> BudgetView:
        """Add ``tokens`` to the group's allocation (its first one makes it a limit)."""
        command = Allocate(type="allocate", group_id=group_id, tokens=tokens)
        return (await self.request(command, message_id=message_id)).view()

    async def get_group_budget(
        self, group_id: str, *, consistency: Consistency | None = None
    ) -> BudgetView:
        """The group's budget, its members' usage and holds included."""
        command = GetBudget(type="get_budget", group_id=group_id, consistency=consistency)
        return (await self.request(command)).view()

    async def get_group_available(self, group_id: str) -> int | None:
        """Tokens the group has left; None: it has no allocation, so no limit."""
        command = GetAvailable(type="get_available", group_id=group_id)
        return (await self.request(command)).available_tokens

    async def set_group_thresholds(
        self, group_id: str, thresholds: Iterable[int], *, message_id: str | None = None
    ) -> BudgetView:
        """Replace the group's usage thresholds (percent; empty: no events)."""
        command = SetThresholds(
            type="set_thresholds", group_id=group_id, thresholds=tuple(thresholds)
        )
        return (await self.request(command, message_id=message_id)).view()

    async def set_group_period(
        self,
        group_id: str,
        period: Period | str | None,
        *,
        timezone: str = "UTC",
        message_id: str | None = None,
    ) -> BudgetView:
        """Reset the group's usage (not its members') at every ``period``
        boundary in ``timezone``; ``None`` removes the period."""
        command = SetPeriod.model_validate(
            {"type": "set_period", "group_id": group_id, "period": period, "timezone": timezone},
            strict=False,
        )
        return (await self.request(command, message_id=message_id)).view()
