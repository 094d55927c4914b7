"""Calendar periods of budgets that reset, in the budget's IANA time zone.

Wall clocks skip and repeat times, so each period is computed as a pair of
UTC instants, and periods tile time: the end of one is the start of the next.
A wall-clock boundary that is skipped starts its period at the transition;
one that is repeated starts it at its first occurrence, except that minutes
and hours follow the clock, so a repeated hour is two periods.
"""

from datetime import UTC, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from token_budget.schemas import Period

__all__ = ["bounds", "local"]

_TICK = timedelta(microseconds=1)
_CLOCK_UNITS = {Period.MINUTE: timedelta(minutes=1), Period.HOUR: timedelta(hours=1)}


def bounds(period: Period, timezone: str, now: datetime) -> tuple[datetime, datetime]:
    """The period containing ``now``: (start, end) in UTC, start <= now < end."""
    zone = _zone(timezone)
    now = _aware(now).astimezone(UTC)
    unit = _CLOCK_UNITS.get(period)
    if unit is not None:
        return _clock_start(zone, unit, now), _clock_end(zone, unit, now)
    # Date arithmetic can land on either side of ``now`` when the date itself
    # repeats or is skipped, so walk to the last boundary not after it.
    wall = _calendar_floor(period, _wall(now, zone))
    while _resolve(zone, wall) > now:
        wall = _calendar_step(period, wall, -1)
    while _resolve(zone, _calendar_step(period, wall, 1)) <= now:
        wall = _calendar_step(period, wall, 1)
    return _resolve(zone, wall), _resolve(zone, _calendar_step(period, wall, 1))


def local(moment: datetime, timezone: str) -> datetime:
    """``moment`` on the budget's wall clock, so that replies carry the zone's offset."""
    return _aware(moment).astimezone(_zone(timezone))


@lru_cache(maxsize=128)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _aware(moment: datetime) -> datetime:
    # A naive datetime would silently be taken as the host's local time.
    if moment.utcoffset() is None:
        raise ValueError(f"an aware datetime is needed, not {moment!r}")
    return moment


def _wall(moment: datetime, zone: ZoneInfo) -> datetime:
    return moment.astimezone(zone).replace(tzinfo=None, fold=0)


def _offset(moment: datetime, zone: ZoneInfo) -> timedelta:
    return _wall(moment, zone) - moment.astimezone(UTC).replace(tzinfo=None)


def _transition(zone: ZoneInfo, before: datetime, after: datetime) -> datetime:
    """First instant in (before, after] on ``after``'s offset; zoneinfo has no public list."""
    target = _offset(after, zone)
    while after - before > _TICK:
        middle = before + (after - before) // 2
        if _offset(middle, zone) == target:
            after = middle
        else:
            before = middle
    return after


def _resolve(zone: ZoneInfo, wall: datetime) -> datetime:
    """First instant whose wall clock reads ``wall`` or later."""
    first = wall.replace(tzinfo=zone).astimezone(UTC)  # fold=0: the earlier offset
    if _wall(first, zone) == wall:
        return first
    # Skipped: fold=1 takes the offset after the jump, which lands before it.
    return _transition(zone, wall.replace(tzinfo=zone, fold=1).astimezone(UTC), first)


def _calendar_floor(period: Period, wall: datetime) -> datetime:
    midnight = datetime.combine(wall.date(), time())
    if period is Period.DAY:
        return midnight
    if period is Period.WEEK:
        return midnight - timedelta(days=wall.weekday())
    return midnight.replace(day=1)


def _calendar_step(period: Period, wall: datetime, steps: int) -> datetime:
    if period is Period.MONTH:
        months = wall.year * 12 + wall.month - 1 + steps
        return wall.replace(year=months // 12, month=months % 12 + 1)
    return wall + timedelta(days=7 if period is Period.WEEK else 1) * steps


def _clock_floor(wall: datetime, unit: timedelta) -> datetime:
    floor = wall.replace(second=0, microsecond=0)
    return floor.replace(minute=0) if unit >= timedelta(hours=1) else floor


def _starts_clock_period(zone: ZoneInfo, unit: timedelta, moment: datetime) -> bool:
    """On a whole unit of the wall clock, or the clock jumped forward over one."""
    wall = _wall(moment, zone)
    floor = _clock_floor(wall, unit)
    return wall == floor or floor > _clock_floor(_wall(moment - _TICK, zone), unit)


def _clock_start(zone: ZoneInfo, unit: timedelta, now: datetime) -> datetime:
    # Step back in absolute time to where the clock read the whole unit; if the
    # offset changed on the way, the period starts at the change or before it.
    wall = _wall(now, zone)
    candidate = now - (wall - _clock_floor(wall, unit))
    if _offset(candidate, zone) == _offset(now, zone):
        return candidate
    change = _transition(zone, candidate, now)
    if _starts_clock_period(zone, unit, change):
        return change
    return _clock_start(zone, unit, change - _TICK)


def _clock_end(zone: ZoneInfo, unit: timedelta, now: datetime) -> datetime:
    wall = _wall(now, zone)
    candidate = now + (_clock_floor(wall, unit) + unit - wall)
    if _offset(candidate, zone) == _offset(now, zone):
        return candidate
    change = _transition(zone, now, candidate)
    if _starts_clock_period(zone, unit, change):
        return change
    return _clock_end(zone, unit, change)
