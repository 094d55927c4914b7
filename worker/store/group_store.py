"""The SQL of groups in a batch: their chains, their rows (locked), and writes.

Lock order: a batch locks its agents' budgets first (by agent id), then every
group it touches, by group id, so concurrent batches on PostgreSQL never wait
on each other in a circle. SQLite holds its one write lock already.
"""

from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BindParameter, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from token_budget.schemas import Period
from token_budget.worker.domain.groups import GroupState
from token_budget.worker.store.batch_store import StaleState
from token_budget.worker.store.tables import group_ledger, group_paths, groups

__all__ = ["load_groups", "write_groups"]

_ids: BindParameter[list[str]] = bindparam("ids", expanding=True)
_select_paths = select(
    group_paths.c.descendant_id, group_paths.c.ancestor_id, group_paths.c.depth
).where(group_paths.c.descendant_id.in_(_ids))
_select_groups = (
    select(
        groups.c.group_id,
        groups.c.parent_id,
        groups.c.allocated_tokens,
        groups.c.used_tokens,
        groups.c.reserved_tokens,
        groups.c.thresholds,
        groups.c.period,
        groups.c.timezone,
        groups.c.period_start,
        groups.c.resets_at,
        groups.c.ledger_seq,
        groups.c.version,
    )
    .where(groups.c.group_id.in_(_ids))
    .order_by(groups.c.group_id)
)
_select_groups_locked = _select_groups.with_for_update()
_update_group = (
    update(groups)
    .where(groups.c.group_id == bindparam("g_id"))
    .where(groups.c.version == bindparam("g_old_version"))
    .values(
        allocated_tokens=bindparam("g_allocated"),
        used_tokens=bindparam("g_used"),
        reserved_tokens=bindparam("g_reserved"),
        thresholds=bindparam("g_thresholds"),
        period=bindparam("g_period"),
        timezone=bindparam("g_timezone"),
        period_start=bindparam("g_period_start"),
        resets_at=bindparam("g_resets_at"),
        ledger_seq=bindparam("g_seq"),
        version=bindparam("g_version"),
        updated_at=bindparam("g_now"),
    )
)


def _utc(moment: datetime | None) -> datetime | None:
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)  # SQLite: naive, stored as UTC


async def load_groups(
    conn: AsyncConnection, wanted: Collection[str], *, lock_rows: bool
) -> dict[str, GroupState]:
    """The groups ``wanted`` names that exist, with all their ancestors; each
    with its chain. Ids that are no group are simply absent."""
    if not wanted:
        return {}
    chains: dict[str, list[tuple[int, str]]] = {}
    for descendant, ancestor, depth in await conn.execute(_select_paths, {"ids": sorted(wanted)}):
        chains.setdefault(descendant, []).append((depth, ancestor))
    every = sorted({a for chain in chains.values() for _, a in chain})
    if not every:
        return {}
    query = _select_groups_locked if lock_rows else _select_groups
    found: dict[str, GroupState] = {}
    for row in await conn.execute(query, {"ids": every}):
        gid, parent, allocated, used, reserved, thresholds, period, tz, start, resets, seq, ver = (
            row
        )
        found[gid] = GroupState(
            gid,
            registered=True,
            parent_id=parent,
            allocated=allocated,
            used=used,
            reserved=reserved,
            thresholds=None if thresholds is None else _thresholds(thresholds),
            period=None if period is None else Period(period),
            timezone=tz,
            period_start=_utc(start),
            resets_at=_utc(resets),
            seq=seq,
            version=ver,
            stored_version=ver,
        )
    for chain in chains.values():
        ordered = tuple(a for _, a in sorted(chain))
        for position, gid in enumerate(ordered):
            if gid in found and len(found[gid].chain) < len(ordered) - position:
                found[gid].chain = ordered[position:]
    return found


def _thresholds(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part)


async def write_groups(
    conn: AsyncConnection,
    states: Iterable[GroupState],
    rows: list[dict[str, Any]],
    now: datetime,
) -> None:
    """Insert new groups and their paths, update changed ones (compare-and-set),
    and append ``rows`` to the groups' ledger."""
    new: list[dict[str, Any]] = []
    paths: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    for group in states:
        if not group.changed:
            continue
        values = {
            "allocated_tokens": group.allocated,
            "used_tokens": group.used,
            "reserved_tokens": group.reserved,
            "thresholds": None
            if group.thresholds is None
            else ",".join(map(str, group.thresholds)),
            "period": group.period,
            "timezone": group.timezone,
            "period_start": group.period_start,
            "resets_at": group.resets_at,
            "ledger_seq": group.seq,
        }
        if group.new_group:
            new.append(
                {
                    "group_id": group.group_id,
                    "parent_id": group.parent_id,
                    "depth": len(group.chain),
                    "version": 1,
                    "created_at": now,
                    "updated_at": now,
                    **values,
                }
            )
            paths.extend(
                {"ancestor_id": a, "descendant_id": group.group_id, "depth": depth}
                for depth, a in enumerate(group.chain)
            )
            continue
        assert group.stored_version is not None
        changed.append(
            {
                "g_id": group.group_id,
                "g_old_version": group.stored_version,
                "g_version": group.stored_version + 1,
                "g_now": now,
                **{f"g_{k.removesuffix('_tokens')}": v for k, v in values.items()},
            }
        )
    if new:
        # Parents first: a new group may be the parent of another in the batch.
        new.sort(key=lambda row: row["depth"])
        for row in new:
            await conn.execute(insert(groups), [row])
        await conn.execute(insert(group_paths), paths)
    if changed:
        result = await conn.execute(_update_group, _renamed(changed))
        if result.rowcount not in (-1, len(changed)):
            raise StaleState(f"{len(changed) - result.rowcount} groups changed underneath")
    if rows:
        await conn.execute(insert(group_ledger), rows)


def _renamed(changed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = {"g_ledger_seq": "g_seq"}
    return [{names.get(k, k): v for k, v in row.items()} for row in changed]
