"""``budgetctl group …``: group budgets by hand (``ctl.py`` runs them).

``create``, ``allocate``, ``move`` and ``show`` go through the broker like
``ctl.py``'s commands; ``tree`` reads the database, read-only, as stored
(on a terminal, a table: ``ctl_render.py``).
"""

import argparse
import json
from typing import TYPE_CHECKING, Any

from token_budget.client import BudgetClient, BudgetView

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "NoSuchGroup",
    "add_group_commands",
    "balances",
    "group_command",
    "tree_entries",
    "tree_lines",
    "tree_table",
]

#: ``group move AGENT none``: out of every group.
NO_GROUP = "none"


class NoSuchGroup(Exception):
    """A database read about a group nobody registered (``group show`` says so too)."""


def add_group_commands(
    sub: Any, common: argparse.ArgumentParser, retry: argparse.ArgumentParser
) -> None:
    """``group`` and its subcommands, on ``budgetctl``'s subparsers ``sub``."""
    group = sub.add_parser("group", help="group budgets: org → team → agent")
    actions = group.add_subparsers(dest="group_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", parents=[common, retry], help="register a group")
    create.add_argument("group", metavar="GROUP")
    create.add_argument("--parent", metavar="P", help="the parent group (default: a root)")
    allocate = actions.add_parser(
        "allocate", parents=[common, retry], help="add tokens to the group"
    )
    allocate.add_argument("group", metavar="GROUP")
    allocate.add_argument("tokens", metavar="TOKENS", type=int)
    show = actions.add_parser("show", parents=[common], help="a group's budget")
    show.add_argument("group", metavar="GROUP")
    move = actions.add_parser(
        "move", parents=[common, retry], help=f"move an agent to GROUP ({NO_GROUP}: to no group)"
    )
    move.add_argument("agent", metavar="AGENT")
    move.add_argument("group", metavar="GROUP")
    tree = actions.add_parser(
        "tree", parents=[common], help="groups under ROOT (default: all) and their agents"
    )
    tree.add_argument("root", metavar="ROOT", nargs="?")


async def group_command(client: BudgetClient, args: argparse.Namespace) -> BudgetView:
    """Run ``group create|allocate|show|move`` through ``client``."""
    message_id = getattr(args, "message_id", None)
    if args.group_command == "create":
        return await client.register_group(args.group, parent_id=args.parent, message_id=message_id)
    if args.group_command == "allocate":
        return await client.allocate_group(args.group, args.tokens, message_id=message_id)
    if args.group_command == "move":
        target = None if args.group == NO_GROUP else args.group
        return await client.set_group(args.agent, target, message_id=message_id)
    return await client.get_group_budget(args.group)


def balances(
    allocated: int | None, used: int | None, reserved: int | None, available: int | None
) -> str:
    """``allocated=… used=… reserved=… available=…``; ``-`` for no limit."""
    shown = ["-" if n is None else str(n) for n in (allocated, used, reserved, available)]
    return "allocated={} used={} reserved={} available={}".format(*shown)


async def tree_lines(url: str, root: str | None, *, as_json: bool) -> list[str]:
    """Each group under its parent, its agents under it, indented by depth."""
    return [
        _group_line(row, as_json) if group else _agent_line(row, depth, as_json)
        for depth, row, group in await tree_entries(url, root)
    ]


async def tree_table(url: str, root: str | None) -> "Table":
    """``tree_lines`` for people: one aligned table, names indented by depth."""
    from token_budget.worker.ctl_render import budget_table, tree_row

    entries = await tree_entries(url, root)
    rows = [tree_row(row, depth, group=group) for depth, row, group in entries]
    return budget_table(rows, name_header="group / agent")


async def tree_entries(url: str, root: str | None) -> list[tuple[int, dict[str, Any], bool]]:
    """(depth, row, is a group) of each group under its parent, then its agents."""
    from token_budget.worker.store import views

    tree = await views.group_tree(url, root)
    if tree is None:
        raise NoSuchGroup(repr(root))
    children: dict[str | None, list[dict[str, Any]]] = {}
    known = {row["group_id"] for row in tree.groups}
    for row in tree.groups:
        # The top of the tree: a root, or ROOT itself (its parent is not shown).
        parent = row["parent_id"] if row["parent_id"] in known else None
        children.setdefault(parent, []).append(row)
    members: dict[str, list[dict[str, Any]]] = {}
    for agent in tree.agents:
        members.setdefault(agent["group_id"], []).append(agent)
    entries: list[tuple[int, dict[str, Any], bool]] = []

    def walk(parent: str | None) -> None:
        for row in children.get(parent, []):
            entries.append((row["depth"], row, True))
            for agent in members.get(row["group_id"], []):
                entries.append((row["depth"] + 1, agent, False))
            walk(row["group_id"])

    walk(None)
    return entries


def _available(row: dict[str, Any]) -> int | None:
    allocated = row["allocated_tokens"]
    if allocated is None:
        return None
    return int(allocated - row["used_tokens"] - row["reserved_tokens"])


def _group_line(row: dict[str, Any], as_json: bool) -> str:
    numbers = (row["allocated_tokens"], row["used_tokens"], row["reserved_tokens"], _available(row))
    if as_json:
        return json.dumps(
            {
                "group_id": row["group_id"],
                "parent_id": row["parent_id"],
                "depth": row["depth"],
                **dict(zip(_TOKEN_FIELDS, numbers, strict=True)),
            }
        )
    return f"{'  ' * row['depth']}{row['group_id']}: {balances(*numbers)}"


def _agent_line(agent: dict[str, Any], depth: int, as_json: bool) -> str:
    numbers = (
        agent["allocated_tokens"],
        agent["used_tokens"],
        agent["reserved_tokens"],
        _available(agent),
    )
    if as_json:
        return json.dumps(
            {
                "agent_id": agent["agent_id"],
                "group_id": agent["group_id"],
                "depth": depth,
                **dict(zip(_TOKEN_FIELDS, numbers, strict=True)),
            }
        )
    if agent["allocated_tokens"] is None:
        return f"{'  ' * depth}{agent['agent_id']}: registered, no budget yet"
    return f"{'  ' * depth}{agent['agent_id']}: {balances(*numbers)}"


_TOKEN_FIELDS = ("allocated_tokens", "used_tokens", "reserved_tokens", "available_tokens")
