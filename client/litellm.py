"""Charge every LiteLLM call to an agent's budget: a LiteLLM callback.

    litellm.callbacks = [BudgetCallback(client, "agent-7")]

Needs ``pip install 'token-budget[litellm]'``; the base SDK never imports this
module. Each call's usage is published with ``consume`` (fire and forget,
confirmed by the broker). A streamed call is charged once, when the stream
has been read to its end: LiteLLM then hands the callback the assembled
response with the stream's usage. A failed call is charged only with the
usage LiteLLM recovered for it (a stream interrupted after usage arrived);
LiteLLM knows none for a call the provider refused, and none is invented.

A callback cannot fail the caller's call, so a usage that cannot be read or
published is logged at ERROR (``token_budget.client.litellm``) and counted in
``failures``; the budget then misses that call, which the log says.
"""

import asyncio
import contextlib
import logging
from typing import Any

from litellm.integrations.custom_logger import CustomLogger

from .client import BudgetClient
from .errors import BudgetClientError
from .usage import Usage, usage_from

__all__ = ["BudgetCallback"]

_log = logging.getLogger(__name__)


class BudgetCallback(CustomLogger):
    """Consumes each LiteLLM call's tokens (prompt plus completion) for ``agent_id``.

    Async calls (``acompletion``) are charged in their event loop; sync calls
    (``completion``, in any thread) in the loop the callback was made in.
    """

    def __init__(self, client: BudgetClient, agent_id: str) -> None:
        super().__init__()
        self.client = client
        self.agent_id = agent_id
        #: Calls whose usage could not be read or published (each one logged).
        self.failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # Made outside a loop: sync calls are charged once an async call set it.
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        await self._charge(response_obj, kwargs)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        known = _known_usage(response_obj, kwargs)
        if known is not None:
            await self._consume(known, kwargs)

    def log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        # LiteLLM runs this for sync calls only, in a thread of its own.
        loop = self._loop
        if loop is None or loop.is_closed():
            self._failed(kwargs, "no event loop to publish in: create the callback in one")
            return
        asyncio.run_coroutine_threadsafe(self._charge(response_obj, kwargs), loop)

    def log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        known = _known_usage(response_obj, kwargs)
        loop = self._loop
        if known is not None and loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._consume(known, kwargs), loop)

    async def _charge(self, response: Any, kwargs: dict[str, Any]) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            usage = usage_from(response)
        except BudgetClientError as error:
            self._failed(kwargs, str(error))
            return
        await self._consume(usage, kwargs)

    async def _consume(self, usage: Usage, kwargs: dict[str, Any]) -> None:
        if usage.tokens == 0:
            return
        # The call's own id: should LiteLLM run a callback twice for one call,
        # the worker counts it once (a message_id has one outcome).
        call_id = kwargs.get("litellm_call_id")
        message_id = f"litellm:{call_id}" if isinstance(call_id, str) and call_id else None
        try:
            await self.client.consume(self.agent_id, usage.tokens, message_id=message_id)
        except BudgetClientError as error:
            self._failed(kwargs, f"{error.code}: {error}")

    def _failed(self, kwargs: dict[str, Any], why: str) -> None:
        self.failures += 1
        _log.error(
            "LiteLLM call %s of model %s not charged to %r: %s",
            kwargs.get("litellm_call_id"),
            kwargs.get("model"),
            self.agent_id,
            why,
        )


def _known_usage(response: Any, kwargs: dict[str, Any]) -> Usage | None:
    """What a failed call is known to have used: the response's usage, or
    LiteLLM's ``combined_usage_object`` (a usage) of a stream cut off mid-way."""
    recovered = kwargs.get("combined_usage_object")
    for source in (response, None if recovered is None else {"usage": recovered}):
        if source is not None:
            try:
                return usage_from(source)
            except BudgetClientError:
                pass
    return None
