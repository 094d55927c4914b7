"""``budgetctl`` for people: aligned tables with usage bars, and ``watch``'s live view.

Rendering only: rows in, rich renderables out. ``ctl.py`` decides when to
use them (stdout is a terminal and no ``--json``) and reads the rows; a pipe
keeps ``ctl.py``'s plain lines, which scripts and tests rely on, so nothing
here is a contract but the look. The bars fall back to ASCII where the
terminal cannot encode block characters, and colour follows rich's rules
(``NO_COLOR`` turns it off).
"""

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from token_budget.schemas import BudgetView
from token_budget.worker.domain.calendar import local

__all__ = [
    "BAR_WIDTH",
    "Row",
    "UsageBar",
    "agent_row",
    "budget_table",
    "console",
    "repeat",
    "tree_row",
    "view_row",
    "watch",
    "watch_table",
]

#: Cells of a usage bar, its percentage aside; fewer on a narrow terminal.
BAR_WIDTH = 16
BAR_MIN_WIDTH = 8
#: `` 100%`` after the cells.
_PERCENT_WIDTH = 5
#: Share of the allocation held (used or reserved) from which a bar turns
#: yellow, as the default 80 % threshold event does; red when nothing is left.
WARN_SHARE = 0.8


@dataclass(frozen=True, slots=True)
class Row:
    """One budget as a table shows it: an agent's or a group's, indented by ``depth``.

    ``allocated`` None is no limit for a group, no budget yet for an agent.
    """

    name: str
    allocated: int | None
    used: int | None
    reserved: int | None
    group: bool = False
    depth: int = 0
    #: ``month, Europe/Berlin``; None without a period.
    period: str | None = None
    resets_at: datetime | None = None
    #: The budget's last change (``watch``).
    updated_at: datetime | None = None

    @property
    def available(self) -> int | None:
        if self.allocated is None:
            return None
        return self.allocated - (self.used or 0) - (self.reserved or 0)


def agent_row(row: Mapping[str, Any]) -> Row:
    """A row of ``views.budgets_page`` or ``views.busiest``."""
    period, resets_at = None, row.get("resets_at")
    if row.get("period") is not None:
        period = f"{row['period']}, {row['timezone']}"
        if resets_at is not None:
            resets_at = local(resets_at, row["timezone"])
    return Row(
        name=row["agent_id"],
        allocated=row["allocated_tokens"],
        used=row["used_tokens"],
        reserved=row["reserved_tokens"],
        period=period,
        resets_at=resets_at,
        updated_at=row.get("updated_at"),
    )


def view_row(view: BudgetView) -> Row:
    """An agent's or a group's budget as the worker answered it (``show``, ``group show``)."""
    period = None if view.period is None else f"{view.period.value}, {view.timezone}"
    return Row(
        name=view.agent_id or view.group_id or "",
        allocated=view.allocated_tokens,
        used=view.used_tokens,
        reserved=view.reserved_tokens,
        group=view.group_id is not None,
        period=period,
        resets_at=view.resets_at,
    )


def tree_row(row: Mapping[str, Any], depth: int, *, group: bool) -> Row:
    """A group or member of ``views.group_tree``, at ``depth`` under the tree's top."""
    return Row(
        name=row["group_id"] if group else row["agent_id"],
        allocated=row["allocated_tokens"],
        used=row["used_tokens"],
        reserved=row["reserved_tokens"],
        group=group,
        depth=depth,
    )


class UsageBar:
    """Used (█), reserved (▒) and free (░) cells of an allocation, and the share used.

    A bar is full only when nothing is available, and shows any use at all;
    used beyond the allocation fills it and shows the real percentage.
    """

    def __init__(self, row: Row, width: int = BAR_WIDTH) -> None:
        self.row = row
        self.width = width

    def text(self, *, ascii_only: bool = False, width: int | None = None) -> Text:
        """The bar in ``width`` cells (default ``self.width``) and its percentage."""
        row = self.row
        width = self.width if width is None else width
        if row.allocated is None:
            note = "no limit" if row.group else "no budget yet"
            return Text(note, style="dim", no_wrap=True, overflow="ellipsis")
        used, reserved = row.used or 0, row.reserved or 0
        allocated = row.allocated
        held = used + reserved
        used_cells = _cells(used, allocated, width)
        held_cells = max(used_cells, _cells(held, allocated, width))
        share = held / allocated if allocated else 1.0
        colour = "red" if held >= allocated else "yellow" if share >= WARN_SHARE else "green"
        full, part, free = ("#", "+", ".") if ascii_only else ("█", "▒", "░")
        bar = Text(no_wrap=True, overflow="ellipsis")
        bar.append(full * used_cells, style=colour)
        bar.append(part * (held_cells - used_cells), style="cyan")
        bar.append(free * (width - held_cells), style="dim")
        percent = 100 * used / allocated if allocated else 100.0
        bar.append(f" {percent:>3.0f}%", style="bold red" if used > allocated else "")
        return bar

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # Never wrapped: fewer cells on a narrow terminal, none on a very narrow one.
        width = max(0, min(self.width, options.max_width - _PERCENT_WIDTH))
        yield self.text(ascii_only=options.ascii_only, width=width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        # A narrow terminal shrinks the bar before it cuts a number.
        return Measurement(BAR_MIN_WIDTH + _PERCENT_WIDTH, self.width + _PERCENT_WIDTH)


def _cells(tokens: int, allocated: int, width: int) -> int:
    """``tokens`` of ``allocated`` in cells: at least one for any, all only for all."""
    if tokens <= 0:
        return 0
    if allocated <= 0 or tokens >= allocated:
        return width
    return min(width - 1, max(1, round(width * tokens / allocated)))


def budget_table(
    rows: Iterable[Row],
    *,
    title: str | None = None,
    caption: str | None = None,
    name_header: str = "agent",
    now: datetime | None = None,
    reserved: bool = True,
) -> Table:
    """Name, the balances right-aligned, the usage bar; a period column when a
    row has one, a column of how long ago each changed when ``now`` is given.
    Without ``reserved`` the bar alone shows what open holds take."""
    rows = list(rows)
    table = Table(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        header_style="bold",
        pad_edge=False,
        collapse_padding=True,
    )
    # On a narrow terminal the widest of the bar, the period and the name give
    # way (a name folds, never cut); numbers never.
    table.add_column(name_header, overflow="fold")
    numbers = (
        ("allocated", "used", "reserved", "available")
        if reserved
        else ("allocated", "used", "available")
    )
    for header in numbers:
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("usage")
    periods = any(row.period is not None for row in rows)
    if periods:
        table.add_column("period", overflow="fold")
    if now is not None:
        table.add_column("changed", justify="right", no_wrap=True)
    for row in rows:
        cells: list[RenderableType] = [
            Text("  " * row.depth + row.name, style="bold" if row.group else ""),
            _tokens(row.allocated),
            _tokens(row.used),
            *([_tokens(row.reserved)] if reserved else []),
            _tokens(row.available),
            UsageBar(row),
        ]
        if periods:
            cells.append(_period(row))
        if now is not None:
            cells.append(_age(row.updated_at, now))
        table.add_row(*cells)
    return table


def watch_table(rows: Iterable[Row], *, by: str, every: float, now: datetime) -> Table:
    """``watch``'s view: the busiest agents ``by`` share or recent change, as of ``now``."""
    order = "most of their budget held" if by == "share" else "most recently changed"
    rows = list(rows)
    noun = "agent" if len(rows) == 1 else "agents"
    title = f"top {len(rows)} {noun}, {order}" if rows else "no agent has a budget yet"
    caption = f"█ used ▒ reserved; {now:%H:%M:%S}, every {every:g}s; Ctrl-C to quit"
    return budget_table(rows, title=title, caption=caption, now=now, reserved=False)


def _tokens(tokens: int | None) -> Text:
    return Text("-" if tokens is None else f"{tokens:,}")


def _period(row: Row) -> Text:
    if row.period is None:
        return Text("")
    if row.resets_at is None:
        return Text(row.period)
    return Text(f"{row.period}; resets {row.resets_at:%Y-%m-%d %H:%M %z}")


def _age(moment: datetime | None, now: datetime) -> Text:
    if moment is None:
        return Text("-")
    seconds = max(0, int((now - moment).total_seconds()))
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return Text(f"{seconds // size}{unit} ago")
    return Text(f"{seconds}s ago")


def console() -> Console:
    """stdout, as rich sees it (a terminal: colour unless ``NO_COLOR``)."""
    return Console(highlight=False)


async def repeat(step: Callable[[], Awaitable[None]], *, every: float, count: int | None) -> None:
    """Run ``step``, then again every ``every`` seconds: ``count`` times in all,
    or until cancelled (Ctrl-C) when None. No sleep after the last."""
    done = 0
    while True:
        await step()
        done += 1
        if count is not None and done >= count:
            return
        await asyncio.sleep(every)


async def watch(
    fetch: Callable[[], Awaitable[RenderableType]],
    out: Console,
    *,
    every: float,
    count: int | None,
) -> None:
    """What ``fetch`` renders, refreshed in place on a terminal (``rich.live.Live``);
    elsewhere each refresh printed below the last. Ctrl-C leaves the last one shown."""
    if not out.is_terminal:

        async def show() -> None:
            out.print(await fetch())

        await repeat(show, every=every, count=count)
        return
    with Live(console=out, auto_refresh=False) as live:

        async def refresh() -> None:
            live.update(await fetch(), refresh=True)

        await repeat(refresh, every=every, count=count)
