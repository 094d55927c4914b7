"""worker.domain.calendar: period boundaries on real time zone data.

Expected instants were worked out by hand from the zone's rules and checked
against zoneinfo; they are written in UTC so that a test cannot pass by
reusing the arithmetic under test.
"""

from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from functools import cache
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from token_budget.schemas import Period
from token_budget.worker.domain.calendar import bounds, local

TICK = timedelta(microseconds=1)


def utc(*fields: int) -> datetime:
    return datetime(*fields, tzinfo=UTC)


def at(zone: str, *fields: int, fold: int = 0) -> datetime:
    """A wall-clock time in ``zone``, as an aware datetime."""
    return datetime(*fields, tzinfo=ZoneInfo(zone), fold=fold)


@pytest.mark.parametrize(
    ("period", "start", "end"),
    [
        (Period.MINUTE, utc(2026, 5, 13, 14, 37), utc(2026, 5, 13, 14, 38)),
        (Period.HOUR, utc(2026, 5, 13, 14), utc(2026, 5, 13, 15)),
        (Period.DAY, utc(2026, 5, 13), utc(2026, 5, 14)),
        (Period.WEEK, utc(2026, 5, 11), utc(2026, 5, 18)),
        (Period.MONTH, utc(2026, 5, 1), utc(2026, 6, 1)),
    ],
)
def test_every_period_in_utc(period: Period, start: datetime, end: datetime) -> None:
    assert bounds(period, "UTC", utc(2026, 5, 13, 14, 37, 25, 500_000)) == (start, end)


@pytest.mark.parametrize("period", list(Period))
def test_bounds_are_in_utc_whatever_the_zone_of_now(period: Period) -> None:
    now = datetime(2026, 5, 13, 20, 7, 25, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    start, end = bounds(period, "Europe/Berlin", now)
    assert start.tzinfo is UTC and end.tzinfo is UTC
    assert (start, end) == bounds(period, "Europe/Berlin", now.astimezone(UTC))


@pytest.mark.parametrize("period", list(Period))
def test_a_boundary_starts_its_period(period: Period) -> None:
    start, end = bounds(period, "Europe/Berlin", utc(2026, 5, 13, 14, 37))
    assert bounds(period, "Europe/Berlin", start) == (start, end)
    assert bounds(period, "Europe/Berlin", end - TICK) == (start, end)
    assert bounds(period, "Europe/Berlin", end)[0] == end


@pytest.mark.parametrize(
    ("now", "start", "end", "hours"),
    [
        # Spring forward: 02:00 CET becomes 03:00 CEST.
        (utc(2026, 3, 29, 12), utc(2026, 3, 28, 23), utc(2026, 3, 29, 22), 23),
        # Fall back: 03:00 CEST becomes 02:00 CET.
        (utc(2026, 10, 25, 12), utc(2026, 10, 24, 22), utc(2026, 10, 25, 23), 25),
    ],
)
def test_berlin_days_of_clock_changes_are_23_and_25_hours(
    now: datetime, start: datetime, end: datetime, hours: int
) -> None:
    assert bounds(Period.DAY, "Europe/Berlin", now) == (start, end)
    assert end - start == timedelta(hours=hours)


def test_new_york_week_spanning_dst_is_an_hour_short() -> None:
    # DST starts on Sunday 2026-03-08: Monday 00:00 EST to Monday 00:00 EDT.
    start, end = bounds(Period.WEEK, "America/New_York", utc(2026, 3, 8, 12))
    assert (start, end) == (utc(2026, 3, 2, 5), utc(2026, 3, 9, 4))
    assert end - start == timedelta(days=7, hours=-1)


@pytest.mark.parametrize(
    ("zone", "now", "start", "end"),
    [
        ("UTC", utc(2026, 1, 31, 23, 59, 59), utc(2026, 1, 1), utc(2026, 2, 1)),
        ("UTC", utc(2028, 2, 29, 12), utc(2028, 2, 1), utc(2028, 3, 1)),
        ("UTC", utc(2027, 2, 28, 23, 59), utc(2027, 2, 1), utc(2027, 3, 1)),
        ("UTC", utc(2026, 12, 31, 23, 59, 59, 999_999), utc(2026, 12, 1), utc(2027, 1, 1)),
        ("Europe/Berlin", utc(2026, 12, 31, 22, 30), utc(2026, 11, 30, 23), utc(2026, 12, 31, 23)),
    ],
    ids=["31-january", "leap-february", "february", "december", "december-in-berlin"],
)
def test_month_runs_to_the_first_of_the_next(
    zone: str, now: datetime, start: datetime, end: datetime
) -> None:
    assert bounds(Period.MONTH, zone, now) == (start, end)


@pytest.mark.parametrize(
    ("now", "start"),
    [
        (at("Europe/Berlin", 2026, 5, 17, 23, 59), utc(2026, 5, 10, 22)),  # Sunday
        (at("Europe/Berlin", 2026, 5, 11, 0, 0), utc(2026, 5, 10, 22)),  # Monday
        (at("Europe/Berlin", 2026, 5, 18, 0, 0), utc(2026, 5, 17, 22)),  # next Monday
    ],
    ids=["sunday-23:59", "monday-00:00", "next-monday-00:00"],
)
def test_week_starts_on_monday(now: datetime, start: datetime) -> None:
    assert bounds(Period.WEEK, "Europe/Berlin", now) == (start, start + timedelta(days=7))


@pytest.mark.parametrize(
    ("zone", "start"),
    [
        ("Asia/Kolkata", utc(2026, 1, 15, 9, 30)),  # +05:30
        ("Asia/Kathmandu", utc(2026, 1, 15, 9, 15)),  # +05:45
        ("Pacific/Chatham", utc(2026, 1, 15, 9, 15)),  # +13:45
    ],
)
def test_hour_follows_the_local_clock_in_zones_off_the_whole_hour(
    zone: str, start: datetime
) -> None:
    assert bounds(Period.HOUR, zone, utc(2026, 1, 15, 10, 10)) == (
        start,
        start + timedelta(hours=1),
    )


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kathmandu", "America/New_York"])
def test_minute_is_the_whole_minute(zone: str) -> None:
    now = utc(2026, 1, 15, 10, 10, 59, 999_999)
    assert bounds(Period.MINUTE, zone, now) == (utc(2026, 1, 15, 10, 10), utc(2026, 1, 15, 10, 11))


@pytest.mark.parametrize(
    ("fold", "start"),
    [(0, utc(2026, 10, 25, 0)), (1, utc(2026, 10, 25, 1))],
    ids=["02:30-cest", "02:30-cet"],
)
def test_each_occurrence_of_a_repeated_hour_is_its_own_period(fold: int, start: datetime) -> None:
    now = at("Europe/Berlin", 2026, 10, 25, 2, 30, fold=fold)
    assert bounds(Period.HOUR, "Europe/Berlin", now) == (start, start + timedelta(hours=1))


def test_last_minute_before_fall_back_ends_at_the_repeated_hour() -> None:
    # 02:59 CEST is followed by 02:00 CET, not by 03:00.
    now = at("Europe/Berlin", 2026, 10, 25, 2, 59, 30)
    assert bounds(Period.MINUTE, "Europe/Berlin", now) == (
        utc(2026, 10, 25, 0, 59),
        utc(2026, 10, 25, 1, 0),
    )


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        # Fall back 02:00 +11 -> 01:30 +10:30: 01:00 to 02:00 lasts 90 minutes.
        (utc(2026, 4, 4, 15, 10), utc(2026, 4, 4, 14), utc(2026, 4, 4, 15, 30)),
        # Spring forward 02:00 +10:30 -> 02:30 +11: 01:00 ends at the jump, which
        # starts an hour 02:xx of 30 minutes.
        (utc(2026, 10, 3, 15, 10), utc(2026, 10, 3, 14, 30), utc(2026, 10, 3, 15, 30)),
        (utc(2026, 10, 3, 15, 40), utc(2026, 10, 3, 15, 30), utc(2026, 10, 3, 16)),
    ],
    ids=["fall-back", "before-spring-forward", "after-spring-forward"],
)
def test_lord_howe_half_hour_shift_stretches_and_shortens_hours(
    now: datetime, start: datetime, end: datetime
) -> None:
    assert bounds(Period.HOUR, "Australia/Lord_Howe", now) == (start, end)


def _midnight_exists(zone: str, year: int, month: int, day: int) -> bool:
    wall = datetime(year, month, day)
    return (
        wall.replace(tzinfo=ZoneInfo(zone))
        .astimezone(UTC)
        .astimezone(ZoneInfo(zone))
        .replace(tzinfo=None)
        == wall
    )


@pytest.mark.parametrize(
    ("zone", "date", "start", "end"),
    [
        # Chile: Saturday 24:00 -04 becomes Sunday 01:00 -03.
        ("America/Santiago", (2026, 9, 6), utc(2026, 9, 6, 4), utc(2026, 9, 7, 3)),
        # Cuba: Sunday 00:00 CST becomes 01:00 CDT.
        ("America/Havana", (2026, 3, 8), utc(2026, 3, 8, 5), utc(2026, 3, 9, 4)),
    ],
)
def test_day_whose_midnight_is_skipped_starts_at_the_jump(
    zone: str, date: tuple[int, int, int], start: datetime, end: datetime
) -> None:
    assert not _midnight_exists(zone, *date)
    assert local(start, zone).hour == 1
    assert bounds(Period.DAY, zone, at(zone, *date, 12)) == (start, end)
    assert bounds(Period.DAY, zone, start - TICK)[1] == start


@pytest.mark.parametrize("fold", [0, 1], ids=["first-00:30", "second-00:30"])
def test_day_whose_midnight_repeats_starts_at_the_first(fold: int) -> None:
    # Cuba: Sunday 01:00 CDT becomes 00:00 CST, so the day is 25 hours.
    now = at("America/Havana", 2026, 11, 1, 0, 30, fold=fold)
    assert bounds(Period.DAY, "America/Havana", now) == (utc(2026, 11, 1, 4), utc(2026, 11, 2, 5))


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        # Samoa skipped Friday 2011-12-30: Thursday 24:00 -10 became Saturday 00:00 +14.
        (utc(2011, 12, 30, 9, 59, 59), utc(2011, 12, 29, 10), utc(2011, 12, 30, 10)),
        (utc(2011, 12, 30, 10), utc(2011, 12, 30, 10), utc(2011, 12, 31, 10)),
    ],
    ids=["thursday", "saturday"],
)
def test_apia_skipped_day_is_no_period(now: datetime, start: datetime, end: datetime) -> None:
    assert bounds(Period.DAY, "Pacific/Apia", now) == (start, end)


@pytest.mark.parametrize(
    ("moment", "zone", "text"),
    [
        (utc(2026, 1, 14, 23), "Europe/Berlin", "2026-01-15T00:00:00+01:00"),
        (utc(2026, 7, 14, 22), "Europe/Berlin", "2026-07-15T00:00:00+02:00"),
        (utc(2026, 1, 15, 0), "Asia/Kathmandu", "2026-01-15T05:45:00+05:45"),
        (utc(2026, 1, 15, 0), "UTC", "2026-01-15T00:00:00+00:00"),
    ],
)
def test_local_carries_the_zone_offset(moment: datetime, zone: str, text: str) -> None:
    assert local(moment, zone).isoformat() == text


@pytest.mark.parametrize(
    "call",
    [lambda now: bounds(Period.DAY, "UTC", now), lambda now: local(now, "UTC")],
    ids=["bounds", "local"],
)
def test_naive_datetimes_are_refused(call: Callable[[datetime], object]) -> None:
    with pytest.raises(ValueError, match="aware"):
        call(datetime(2026, 1, 15))


ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "America/Santiago",
    "America/Havana",
    "Pacific/Apia",
    "Pacific/Chatham",
    "Europe/London",
]
FIRST, LAST = utc(2000, 1, 1), utc(2041, 1, 1)


@cache
def transitions(name: str) -> list[datetime]:
    """The zone's offset changes in 2000-2040, found by a weekly scan and bisection."""
    zone, found, moment = ZoneInfo(name), [], FIRST
    while moment < LAST:
        after = moment + timedelta(days=7)
        if moment.astimezone(zone).utcoffset() != after.astimezone(zone).utcoffset():
            before, target = moment, after.astimezone(zone).utcoffset()
            while after - before > timedelta(seconds=1):
                middle = before + (after - before) // 2
                if middle.astimezone(zone).utcoffset() == target:
                    after = middle
                else:
                    before = middle
            found.append(after)
        moment += timedelta(days=7)
    return found


@st.composite
def instants(draw: st.DrawFn, zone: str) -> datetime:
    """Uniform over 2000-2040, or close to one of the zone's clock changes."""
    changes = transitions(zone)
    if not changes or draw(st.booleans()):
        return draw(
            st.datetimes(
                FIRST.replace(tzinfo=None), LAST.replace(tzinfo=None), timezones=st.just(UTC)
            )
        )
    near = draw(st.sampled_from([timedelta(minutes=3), timedelta(hours=3), timedelta(days=3)]))
    return draw(st.sampled_from(changes)) + draw(st.timedeltas(-near, near))


@settings(max_examples=300, deadline=None)
@given(
    period=st.sampled_from(Period),
    case=st.sampled_from(ZONES).flatmap(lambda z: st.tuples(st.just(z), instants(z))),
)
def test_periods_tile_time(period: Period, case: tuple[str, datetime]) -> None:
    zone, now = case
    start, end = bounds(period, zone, now)
    assert start <= now < end
    assert start.tzinfo is UTC and end.tzinfo is UTC
    assert bounds(period, zone, start) == (start, end)
    assert bounds(period, zone, end - TICK) == (start, end)
    assert bounds(period, zone, end)[0] == end
    assert bounds(period, zone, start - TICK)[1] == start
