"""Charge every LangChain model run to an agent's budget: a callback handler.

    await model.ainvoke(prompt, config={"callbacks": [BudgetHandler(client, "agent-7")]})

Needs ``pip install 'token-budget[langchain]'``; the base SDK never imports
this module. On each ``on_llm_end`` the handler reads the run's usage: the
``usage_metadata`` of each prompt's generated message (a stream's aggregated
message too), else the ``token_usage`` of ``llm_output`` (older integrations),
and publishes it with ``consume``. A failed run reports no usage in
LangChain, so nothing is charged for it.

A handler's error never fails the run (LangChain logs it), so a usage that
cannot be read or published is logged at ERROR and counted in ``failures``.
"""

import logging
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.outputs import LLMResult

from .client import BudgetClient
from .errors import BudgetClientError, UsageMissing
from .usage import Usage, usage_from

__all__ = ["BudgetHandler"]

_log = logging.getLogger(__name__)


class BudgetHandler(AsyncCallbackHandler):
    """Consumes each model run's tokens (prompt plus completion) for ``agent_id``."""

    def __init__(self, client: BudgetClient, agent_id: str) -> None:
        self.client = client
        self.agent_id = agent_id
        #: Runs whose usage could not be read or published (each one logged).
        self.failures = 0

    async def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            usage = run_usage(response)
            await self.client.consume(self.agent_id, usage.tokens)
        except BudgetClientError as error:
            self.failures += 1
            _log.error("LangChain run %s not charged to %r: %s", run_id, self.agent_id, error)


def run_usage(result: LLMResult) -> Usage:
    """The usage of one run: each prompt's first generation that carries usage
    (a prompt's candidates share one call), added up over the prompts."""
    total: Usage | None = None
    for candidates in result.generations:
        for generation in candidates:
            message = getattr(generation, "message", None)
            if getattr(message, "usage_metadata", None):
                part = usage_from(message)
                total = part if total is None else total + part
                break
    if total is not None:
        return total
    token_usage = (result.llm_output or {}).get("token_usage")
    if token_usage:
        return usage_from({"usage": token_usage})
    raise UsageMissing("the model run reported no usage_metadata and no llm_output token_usage")
