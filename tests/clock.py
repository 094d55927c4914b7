"""A clock the test moves: what the worker's batches read as "now"."""

from datetime import UTC, datetime, timedelta

__all__ = ["Clock", "SkewedClock"]


class Clock:
    """Stands still until ``advance`` or ``set``; callable like ``datetime.now(UTC)``."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now

    def set(self, moment: datetime) -> None:
        self.now = moment


class SkewedClock:
    """The real clock moved by a fixed offset: time passes, from another day."""

    def __init__(self, offset: timedelta) -> None:
        self.offset = offset

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset
