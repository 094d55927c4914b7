"""``budgetctl``: operate budgets by hand, through the broker like any agent.

State changes are commands published with the client SDK, never SQL, so they
are ordered with the agents' own commands and deduplicated by message_id:
pass ``--message-id`` to retry one safely. ``list``, ``history``,
``reconcile``, ``workers``, ``watch`` and ``group tree`` read the database, read-only. Exit
codes are ``worker/exitcodes.py``'s: a script may retry on 2, never on 1 or 64.

On a terminal ``list``, ``show``, ``group show`` and ``group tree`` print a
table (``ctl_render.py``); a pipe gets the plain lines, ``--json`` JSON.
"""

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from token_budget.client import (
    BudgetClient,
    BudgetClientError,
    BudgetView,
    CommandRefused,
    NoWorker,
)
from token_budget.schemas import PERIOD_FIELDS, QUERY_FIELDS, Period
from token_budget.worker.ctl_groups import (
    NoSuchGroup,
    add_group_commands,
    balances,
    group_command,
    tree_lines,
    tree_table,
)
from token_budget.worker.errors import NoDatabase, ViewError
from token_budget.worker.exitcodes import EPILOG, ExitCode, UsageParser
from token_budget.worker.settings import Settings
from token_budget.worker.urls import broker_user, redact_url

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["NoSuchAgent", "build_parser", "main"]


class NoSuchAgent(Exception):
    """A database read about an agent nobody registered (``show`` says so too)."""


def build_parser() -> argparse.ArgumentParser:
    common = UsageParser(add_help=False)
    common.add_argument("--amqp-url", help="default: BUDGET_AMQP_URL or the worker's default")
    common.add_argument(
        "--database-url",
        help="for list, history, reconcile, workers, watch and group tree; default: "
        "BUDGET_DATABASE_URL or the worker's default",
    )
    common.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    common.add_argument("--json", action="store_true", help="one JSON object per line")
    retry = UsageParser(add_help=False)
    retry.add_argument("--message-id", help="reuse to retry a command safely (default: new)")

    parser = UsageParser(
        prog="budgetctl",
        description="Register agents, allocate and consume tokens, inspect.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register = sub.add_parser("register", parents=[common, retry], help="register an agent")
    register.add_argument("agent", metavar="AGENT")
    register.add_argument("--group", metavar="G", help="the agent's group (group create)")
    allocate = sub.add_parser("allocate", parents=[common, retry], help="add tokens")
    allocate.add_argument("agent", metavar="AGENT")
    allocate.add_argument("tokens", metavar="TOKENS", type=int)
    consume = sub.add_parser("consume", parents=[common, retry], help="use tokens")
    consume.add_argument("agent", metavar="AGENT")
    consume.add_argument("tokens", metavar="TOKENS", type=int)
    consume.add_argument(
        "--wait", action="store_true", help="wait for the worker's answer, not only the broker's"
    )
    period = sub.add_parser(
        "period",
        parents=[common, retry],
        help="reset the agent's usage every minute, hour, day, week or month (none: never)",
    )
    period.add_argument("agent", metavar="AGENT")
    period.add_argument("period", choices=[*Period, "none"], metavar="PERIOD")
    period.add_argument("--timezone", default="UTC", help="IANA name (default UTC)")
    show = sub.add_parser("show", parents=[common], help="an agent's budget")
    show.add_argument("agent", metavar="AGENT")
    listing = sub.add_parser("list", parents=[common], help="agents and budgets, by agent id")
    listing.add_argument("--limit", type=_positive, default=100, help="most rows (default 100)")
    hist = sub.add_parser("history", parents=[common], help="an agent's ledger, oldest first")
    hist.add_argument("agent", metavar="AGENT")
    hist.add_argument("--limit", type=_positive, default=None, help="most rows")
    hist.add_argument(
        "--period", action="store_true", help="the tokens used in each period, oldest first"
    )
    sub.add_parser(
        "reconcile",
        parents=[common],
        help="check every balance against its ledger; exit 3 on any difference",
    )
    sub.add_parser("workers", parents=[common], help="live workers and the partitions they hold")
    watch = sub.add_parser("watch", parents=[common], help="the busiest agents, live, until Ctrl-C")
    watch.add_argument("--top", type=_positive, default=10, help="agents shown (default 10)")
    watch.add_argument(
        "--interval", type=_seconds, default=2.0, help="seconds between refreshes (default 2)"
    )
    watch.add_argument(
        "--by",
        choices=("share", "recent"),
        default="share",
        help="share: most of the allocation used or reserved (default); recent: last changed",
    )
    watch.add_argument(
        "--count", type=_positive, default=None, help="stop after N refreshes (default: never)"
    )
    add_group_commands(sub, common, retry)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Failures are reported once, below; not again by the AMQP libraries' logs.
    logging.getLogger().addHandler(logging.NullHandler())
    # Tables for people; a pipe keeps the plain lines that scripts read.
    args.table = not args.json and sys.stdout.isatty()
    settings = Settings()
    try:
        output, failed = asyncio.run(_run(args, settings))
        if isinstance(output, list):
            for line in output:
                print(line)
        else:
            from token_budget.worker.ctl_render import console

            console().print(output)
        if failed:
            return _fail(failed, FAILURES[failed])
    except KeyboardInterrupt:
        if args.command != "watch":
            raise
        return ExitCode.OK  # how a watch ends
    except CommandRefused as error:
        return _fail(ExitCode.REFUSED, f"refused: {error.code}: {error.message}")
    except NoSuchAgent as error:
        return _fail(ExitCode.REFUSED, f"refused: agent_not_found: agent {error} is not registered")
    except NoSuchGroup as error:
        return _fail(ExitCode.REFUSED, f"refused: group_not_found: group {error} is not registered")
    except ValidationError as error:
        issues = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return _fail(ExitCode.REFUSED, f"invalid_command: {issues}")
    except ValueError as error:  # a malformed --message-id, say
        return _fail(ExitCode.REFUSED, f"invalid input: {error}")
    except BudgetClientError as error:
        url = redact_url(args.amqp_url or settings.amqp_url.get_secret_value())
        return _fail(ExitCode.UNREACHABLE, f"{error.code}: {error.message} (broker {url})")
    except NoDatabase as error:
        return _fail(ExitCode.UNREACHABLE, str(error))
    except ViewError as error:
        url = redact_url(args.database_url or settings.database_url.get_secret_value())
        return _fail(ExitCode.UNREACHABLE, f"database error: {error} (database {url})")
    return ExitCode.OK


#: Why a command that printed its lines still failed, by exit code.
FAILURES = {
    ExitCode.UNRECONCILED: "the books do not reconcile (see above)",
    ExitCode.UNREACHABLE: "no worker is live: start one with `make run`",
}


def _fail(code: ExitCode, message: str) -> int:
    print(f"budgetctl: {message}", file=sys.stderr)
    return code


async def _run(
    args: argparse.Namespace, settings: Settings
) -> tuple["list[str] | Table", ExitCode]:
    """The lines (or table) to print, and the exit code of a command that ran but failed."""
    if args.command == "group" and args.group_command == "tree":
        url = args.database_url or settings.database_url.get_secret_value()
        if args.table:
            return await tree_table(url, args.root), ExitCode.OK
        return await tree_lines(url, args.root, as_json=args.json), ExitCode.OK
    if args.command in _DATABASE_COMMANDS:
        from token_budget.worker.store import views

        url = args.database_url or settings.database_url.get_secret_value()
        if args.command == "list":
            rows = await views.budgets_page(url, args.limit)
            if args.table:
                from token_budget.worker.ctl_render import agent_row, budget_table

                return budget_table(map(agent_row, rows)), ExitCode.OK
            return [_row_line(row, args.json) for row in rows], ExitCode.OK
        if args.command == "watch":
            await _watch(args, url)
            return [], ExitCode.OK
        if args.command == "history" and args.period:
            periods = await views.periods_of(url, args.agent)
            if periods is None:
                raise NoSuchAgent(repr(args.agent))
            return _period_lines(*periods, as_json=args.json), ExitCode.OK
        if args.command == "history":
            entries = await views.ledger_of(url, args.agent, args.limit)
            if entries is None:
                raise NoSuchAgent(repr(args.agent))
            return [_entry_line(e, args.json) for e in entries], ExitCode.OK
        if args.command == "reconcile":
            found = await views.reconciled(url)
            code = ExitCode.UNRECONCILED if found else ExitCode.OK
            if args.json:
                return [json.dumps(dataclasses.asdict(d), default=str) for d in found], code
            return [str(d) for d in found] or ["books reconcile: no difference"], code
        view = await views.pool(url, settings.member_ttl)
        # Nobody would apply a command now: a script checking for a pool must see it.
        return _pool_lines(view, args.json), ExitCode.OK if view.live else ExitCode.UNREACHABLE
    return await _broker(args, settings), ExitCode.OK


_DATABASE_COMMANDS = frozenset({"list", "history", "reconcile", "workers", "watch"})


async def _watch(args: argparse.Namespace, url: str) -> None:
    """``watch``: a live table; with ``--json`` one line per refresh, ``{"agents": [...]}``
    (each as ``list --json`` prints it)."""
    from token_budget.worker import ctl_render
    from token_budget.worker.store import views

    if args.json:

        async def line() -> None:
            rows = await views.busiest(url, args.top, by=args.by)
            shown = [json.loads(_row_line(row, as_json=True)) for row in rows]
            print(json.dumps({"agents": shown}), flush=True)

        await ctl_render.repeat(line, every=args.interval, count=args.count)
        return

    async def table() -> "Table":
        rows = await views.busiest(url, args.top, by=args.by)
        return ctl_render.watch_table(
            map(ctl_render.agent_row, rows), by=args.by, every=args.interval, now=datetime.now(UTC)
        )

    await ctl_render.watch(table, ctl_render.console(), every=args.interval, count=args.count)


def _entry_line(entry: Any, as_json: bool) -> str:
    if as_json:
        return json.dumps(dataclasses.asdict(entry), default=str)
    return (
        f"{entry.seq:>6} {entry.created_at:%Y-%m-%d %H:%M:%S} {entry.kind:<10} "
        f"{entry.amount:>12} -> allocated={entry.allocated_after} used={entry.used_after} "
        f"reserved={entry.reserved_after} ({entry.message_id})"
    )


def _pool_lines(view: Any, as_json: bool) -> list[str]:
    live = set(view.live)
    lines = []
    for member in view.members:
        held = view.held_by(member.worker_id)
        state = "live" if member.worker_id in live else "gone"
        age = round(view.now - member.heartbeat_at, 1)
        if as_json:
            lines.append(
                json.dumps(
                    {
                        "worker_id": member.worker_id,
                        "name": member.name,
                        "state": state,
                        "seen_seconds_ago": age,
                        "partitions": held,
                    }
                )
            )
        else:
            lines.append(
                f"{member.worker_id} {member.name} {state} (seen {age}s ago) "
                f"partitions={','.join(map(str, held)) or '-'}"
            )
    free = [p for p, lease in view.leases.items() if p not in _held_anywhere(view)]
    if not as_json:
        if not view.members:
            lines.append("no workers")
        lines.append(f"unowned partitions: {','.join(map(str, free)) or '-'}")
    return lines


def _held_anywhere(view: Any) -> set[int]:
    return {p for member in view.members for p in view.held_by(member.worker_id)}


async def _broker(args: argparse.Namespace, settings: Settings) -> "list[str] | Table":
    amqp_url = args.amqp_url or settings.amqp_url.get_secret_value()
    agent, tokens = getattr(args, "agent", ""), getattr(args, "tokens", 0)
    message_id = getattr(args, "message_id", None)
    # The broker checks user_id against the connection's user, so sending it is
    # always safe, and it is what a worker with BUDGET_AUTH=user-id decides by.
    async with BudgetClient.connect(
        amqp_url, timeout=args.timeout, name="budgetctl", user_id=broker_user(amqp_url)
    ) as client:
        if not (args.command == "consume" and not args.wait) and not await client.lane_consumers():
            # Fail now, not after the timeout: nothing was sent, nothing will answer.
            raise NoWorker("no worker is consuming the lanes: start one with `make run`")
        if args.command == "group":
            view = await group_command(client, args)
        elif args.command == "register":
            view = await client.register_agent(agent, group_id=args.group, message_id=message_id)
        elif args.command == "allocate":
            view = await client.allocate(agent, tokens, message_id=message_id)
        elif args.command == "period":
            chosen = None if args.period == "none" else Period(args.period)
            view = await client.set_period(
                agent, chosen, timezone=args.timezone, message_id=message_id
            )
        elif args.command == "consume" and args.wait:
            view = await client.consume_and_wait(agent, tokens, message_id=message_id)
        elif args.command == "consume":
            sent = await client.consume(agent, tokens, message_id=message_id)
            if args.json:
                status = {"agent_id": agent, "tokens": tokens, "message_id": sent}
                return [json.dumps({**status, "status": "confirmed"})]
            return [
                f"{agent}: consume of {tokens} tokens confirmed by the broker "
                f"(message_id {sent}); a refusal is published on budget.events"
            ]
        else:
            view = await client.get_budget(agent)
    if (
        args.table
        and args.command in ("show", "group")
        and getattr(args, "group_command", "show") == "show"
    ):
        from token_budget.worker.ctl_render import budget_table, view_row

        return budget_table([view_row(view)], name_header="group" if view.group_id else "agent")
    return [_view_line(view, args.json)]


def _view_line(view: BudgetView, as_json: bool) -> str:
    if as_json:
        absent = set(QUERY_FIELDS) | (set(PERIOD_FIELDS) if view.period is None else set())
        # Like the wire: a group's budget has no agent_id, an agent's no group_id.
        absent.add("group_id" if view.group_id is None else "agent_id")
        return view.model_dump_json(exclude=absent)
    if view.group_id is None and view.allocated_tokens is None:
        return f"{view.agent_id}: registered, no budget yet"
    line = f"{view.agent_id or view.group_id}: " + balances(
        view.allocated_tokens, view.used_tokens, view.reserved_tokens, view.available_tokens
    )
    if view.period is not None and view.resets_at is not None:
        line += (
            f"; per {view.period.value} ({view.timezone}), resets at {view.resets_at.isoformat()}"
        )
    return line


def _period_lines(periods: list[Any], timezone: str | None, *, as_json: bool) -> list[str]:
    from token_budget.worker.domain.calendar import local

    lines = []
    for usage in periods:
        start = usage.start
        if start is not None and timezone is not None:
            start = local(start, timezone)
        if as_json:
            shown = None if start is None else start.isoformat()
            lines.append(
                json.dumps({"period_start": shown, "used": usage.used, "closed": usage.closed})
            )
            continue
        label = "without a period" if start is None else f"from {start.isoformat()}"
        state = "" if usage.closed else " (current)"
        lines.append(f"{label}: used={usage.used}{state}")
    return lines


def _row_line(row: dict[str, Any], as_json: bool) -> str:
    from token_budget.worker.domain.calendar import local

    allocated, used, reserved = row["allocated_tokens"], row["used_tokens"], row["reserved_tokens"]
    available = None if allocated is None else allocated - used - reserved
    period: dict[str, Any] = {}
    if row["period"] is not None:
        timezone = row["timezone"]
        period = {
            "period": row["period"],
            "timezone": timezone,
            "period_start": local(row["period_start"], timezone),
            "resets_at": local(row["resets_at"], timezone),
        }
    return _view_line(
        BudgetView(
            agent_id=row["agent_id"],
            allocated_tokens=allocated,
            used_tokens=used,
            reserved_tokens=reserved,
            available_tokens=available,
            **period,
        ),
        as_json,
    )


if __name__ == "__main__":
    sys.exit(main())
