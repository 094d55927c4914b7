"""Reservations in the SDK: hold tokens before an LLM call, settle after it.

    async with client.reservation("agent-7", max_tokens=2_000) as hold:
        response = await llm(prompt, max_tokens=2_000)
        hold.used_from(response)  # or hold.used(tokens)

On a normal exit the hold is committed with the usage reported through
``used()`` or ``used_from()``, or with the whole hold if nothing was reported:
a budget must never under-count, and an unreported call may have used it all.
On an exception the hold is released, unless usage was reported before the
exception, which then is committed: the tokens were spent either way (a
response without usage reports the whole hold before ``used_from`` raises).
Every command keeps its message_id across retries, so a timeout never
applies anything twice.
"""

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any

from token_budget.schemas import (
    BudgetView,
    Command,
    Commit,
    OkReply,
    Period,
    Release,
    Reserve,
    SetPeriod,
    SetThresholds,
)

from .errors import InvalidReply, RequestTimeout, UsageMissing
from .usage import Usage, usage_from

__all__ = ["Reservation", "ReservationCommands", "ReservationScope"]

_log = logging.getLogger(__name__)


@dataclass
class Reservation:
    """A hold the worker granted: ``tokens`` are set aside until ``expires_at``."""

    reservation_id: str
    agent_id: str
    tokens: int
    expires_at: datetime
    #: The budget right after the hold was made.
    budget: BudgetView
    #: Total tokens the call really used, once reported with ``used()``.
    reported: int | None = field(default=None)

    def used(self, tokens: int) -> None:
        """Report the total tokens the call used (a later call replaces it).

        More than the hold is allowed: the commit then needs the difference to
        be available in the budget, or it is refused with ``insufficient_budget``.
        """
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"used tokens must be an integer >= 0, not {tokens!r}")
        self.reported = tokens

    def used_from(self, response: object) -> Usage:
        """Report what an LLM response says it used (``usage_from``) and return it.

        A response without usage raises ``UsageMissing`` after reporting the
        whole hold: the call was made, so even if the error leaves the ``async
        with``, the hold is committed in full, never released as if unspent.
        """
        try:
            usage = usage_from(response)
        except UsageMissing:
            self.used(self.tokens)
            raise
        self.used(usage.tokens)
        return usage


class ReservationCommands:
    """The reservation, threshold and period commands of ``BudgetClient``."""

    #: Attempts per command of ``reservation()`` when no reply comes in time.
    reservation_attempts = 3

    async def request(
        self,
        command: Command,
        *,
        message_id: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the client's signature
    ) -> OkReply:
        raise NotImplementedError  # BudgetClient.request

    async def reserve(
        self,
        agent_id: str,
        tokens: int,
        *,
        ttl_seconds: int | None = None,
        message_id: str | None = None,
    ) -> Reservation:
        """Hold ``tokens``; raise ``InsufficientBudgetError`` if they are not available.

        A retry with the same ``message_id`` returns the same reservation.
        """
        command = Reserve(type="reserve", agent_id=agent_id, tokens=tokens, ttl_seconds=ttl_seconds)
        reply = await self.request(command, message_id=message_id)
        if reply.reservation_id is None or reply.expires_at is None:
            raise InvalidReply(f"reserve for {agent_id!r} answered without a reservation")
        return Reservation(reply.reservation_id, agent_id, tokens, reply.expires_at, reply.view())

    async def commit(
        self, agent_id: str, reservation_id: str, tokens: int, *, message_id: str | None = None
    ) -> BudgetView:
        """Settle a hold: ``tokens`` were really used (0 allowed), the rest is freed."""
        command = Commit(
            type="commit", agent_id=agent_id, reservation_id=reservation_id, tokens=tokens
        )
        return (await self.request(command, message_id=message_id)).view()

    async def release(
        self, agent_id: str, reservation_id: str, *, message_id: str | None = None
    ) -> BudgetView:
        """Free a hold unused."""
        command = Release(type="release", agent_id=agent_id, reservation_id=reservation_id)
        return (await self.request(command, message_id=message_id)).view()

    async def set_thresholds(
        self, agent_id: str, thresholds: Iterable[int], *, message_id: str | None = None
    ) -> BudgetView:
        """Replace the budget's usage thresholds (percent; empty: no events)."""
        command = SetThresholds(
            type="set_thresholds", agent_id=agent_id, thresholds=tuple(thresholds)
        )
        return (await self.request(command, message_id=message_id)).view()

    async def set_period(
        self,
        agent_id: str,
        period: Period | str | None,
        *,
        timezone: str = "UTC",
        message_id: str | None = None,
    ) -> BudgetView:
        """Reset the budget's usage at every ``period`` boundary in ``timezone``
        (an IANA name), from the next boundary on; ``None`` removes the period.

        The view says when: ``period_start`` and ``resets_at``.
        """
        command = SetPeriod.model_validate(
            {"type": "set_period", "agent_id": agent_id, "period": period, "timezone": timezone},
            strict=False,
        )
        return (await self.request(command, message_id=message_id)).view()

    def reservation(
        self, agent_id: str, max_tokens: int, *, ttl_seconds: int | None = None
    ) -> "ReservationScope":
        """``async with client.reservation(agent, n) as hold: ...; hold.used(actual)``."""
        return ReservationScope(self, agent_id, max_tokens, ttl_seconds)


class ReservationScope:
    """Reserve on entry; commit or release on exit (see the module's docstring)."""

    def __init__(
        self,
        client: ReservationCommands,
        agent_id: str,
        max_tokens: int,
        ttl_seconds: int | None,
    ) -> None:
        self._client = client
        self._agent_id = agent_id
        self._max_tokens = max_tokens
        self._ttl = ttl_seconds
        # Chosen once: every retry of a step is the same command to the worker.
        self._ids = {step: uuid.uuid4().hex for step in ("reserve", "commit", "release")}
        self.reservation: Reservation | None = None
        #: The budget after the hold was settled (None until then).
        self.settled: BudgetView | None = None

    async def __aenter__(self) -> Reservation:
        self.reservation = await self._retrying(
            lambda: self._client.reserve(
                self._agent_id,
                self._max_tokens,
                ttl_seconds=self._ttl,
                message_id=self._ids["reserve"],
            )
        )
        return self.reservation

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        hold = self.reservation
        if hold is None:
            return
        if exc is None or hold.reported is not None:
            used = hold.tokens if hold.reported is None else hold.reported
            settle = self._commit(hold, used)
        else:
            settle = self._release(hold)
        try:
            self.settled = await self._retrying(settle)
        except Exception:
            if exc is None:
                raise
            # The body's exception is the one to see; the hold expires anyway.
            _log.warning("could not settle reservation %s", hold.reservation_id, exc_info=True)

    def _commit(self, hold: Reservation, used: int) -> Any:
        return lambda: self._client.commit(
            hold.agent_id, hold.reservation_id, used, message_id=self._ids["commit"]
        )

    def _release(self, hold: Reservation) -> Any:
        return lambda: self._client.release(
            hold.agent_id, hold.reservation_id, message_id=self._ids["release"]
        )

    async def _retrying(self, step: Any) -> Any:
        for attempt in range(1, self._client.reservation_attempts + 1):
            try:
                return await step()
            except RequestTimeout:
                # Same message_id again: applied at most once, answered either way.
                if attempt == self._client.reservation_attempts:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover
