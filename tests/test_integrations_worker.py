"""The LLM integrations against the real worker, broker and both databases:
consume_usage, hold.used_from, the LiteLLM callback (mock_response: no
network, no key) and the LangChain handler (a fake chat model)."""

import asyncio
import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
import openai
from langchain_core.language_models.fake_chat_models import (
    FakeMessagesListChatModel,
)
from langchain_core.messages import AIMessage
from openai.types.chat import ChatCompletion

from tests.eventually import eventually
from tests.support import funded
from token_budget.client import BudgetClient, UsageMissing
from token_budget.client.langchain import BudgetHandler
from token_budget.client.litellm import BudgetCallback

MESSAGES = [{"role": "user", "content": "hello"}]


def completion(prompt: int, completion: int, cached: int = 0) -> ChatCompletion:
    return ChatCompletion.model_validate(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant"}}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }
    )


async def used(client: BudgetClient, agent: str, tokens: int) -> None:
    await eventually(
        lambda: client.get_budget(agent),
        within=10,
        what=f"{agent} used {tokens} tokens",
        done=lambda view: view.used_tokens == tokens,
    )


@pytest.fixture
def callbacks() -> Iterator[list[object]]:
    """litellm.callbacks for this test alone."""
    saved = list(litellm.callbacks)
    litellm.callbacks = []
    yield litellm.callbacks
    litellm.callbacks = saved


# -- the SDK ------------------------------------------------------------------


async def test_consume_usage_charges_prompt_plus_completion(client: BudgetClient) -> None:
    agent = await funded(client, 1000)
    await client.consume_usage(agent, completion(100, 20, cached=80))
    await used(client, agent, 120)


async def test_consume_usage_without_usage_publishes_nothing(client: BudgetClient) -> None:
    agent = await funded(client, 1000)
    with pytest.raises(UsageMissing):
        await client.consume_usage(agent, [])
    assert (await client.get_budget(agent)).used_tokens == 0


async def test_hold_used_from_commits_the_response_usage(client: BudgetClient) -> None:
    agent = await funded(client, 1000)
    async with client.reservation(agent, 400) as hold:
        assert hold.used_from(completion(60, 40)).tokens == 100
    after = await client.get_budget(agent)
    assert (after.used_tokens, after.reserved_tokens) == (100, 0)


async def test_hold_used_from_a_response_without_usage_commits_the_whole_hold(
    client: BudgetClient,
) -> None:
    agent = await funded(client, 1000)
    with pytest.raises(UsageMissing):
        async with client.reservation(agent, 400) as hold:
            hold.used_from([])
    after = await client.get_budget(agent)
    assert (after.used_tokens, after.reserved_tokens) == (400, 0)


# -- LiteLLM ------------------------------------------------------------------


async def test_the_litellm_callback_charges_a_call(
    client: BudgetClient, callbacks: list[object]
) -> None:
    agent = await funded(client, 1000)
    callbacks.append(BudgetCallback(client, agent))
    reply = await litellm.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="hi")
    assert reply.usage.total_tokens > 0
    await used(client, agent, reply.usage.total_tokens)


async def test_the_litellm_callback_run_twice_for_one_call_charges_it_once(
    client: BudgetClient, callbacks: list[object]
) -> None:
    agent = await funded(client, 1000)
    callback = BudgetCallback(client, agent)
    callbacks.append(callback)
    reply = await litellm.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="hi")
    await used(client, agent, reply.usage.total_tokens)
    # What LiteLLM passes for that call, once more (a retried or doubled callback).
    again = {"litellm_call_id": reply._hidden_params["litellm_call_id"]}
    await callback.async_log_success_event(again, reply, None, None)
    await callback.async_log_success_event(again, reply, None, None)
    await client.consume(agent, 1)  # behind the repeats on the agent's lane
    await used(client, agent, reply.usage.total_tokens + 1)


async def test_the_litellm_callback_charges_a_streamed_call_once_at_its_end(
    client: BudgetClient, callbacks: list[object]
) -> None:
    agent = await funded(client, 1000)
    callbacks.append(BudgetCallback(client, agent))
    stream = await litellm.acompletion(
        model="gpt-4o-mini",
        messages=MESSAGES,
        mock_response="hello there, friend",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None and usage.total_tokens > 0
    await used(client, agent, usage.total_tokens)


async def test_the_litellm_callback_charges_a_sync_call_from_another_thread(
    client: BudgetClient, callbacks: list[object]
) -> None:
    agent = await funded(client, 1000)
    callbacks.append(BudgetCallback(client, agent))
    reply = await asyncio.to_thread(
        litellm.completion, model="gpt-4o-mini", messages=MESSAGES, mock_response="hi"
    )
    await used(client, agent, reply.usage.total_tokens)


async def test_the_litellm_callback_charges_nothing_for_a_refused_call(
    client: BudgetClient, callbacks: list[object]
) -> None:
    agent = await funded(client, 1000)
    callback = BudgetCallback(client, agent)
    callbacks.append(callback)
    with pytest.raises(openai.APIError, match="refused"):
        await litellm.acompletion(
            model="gpt-4o-mini", messages=MESSAGES, mock_response=Exception("refused")
        )
    # Then a call that succeeds: once it is charged, the failure was handled before it.
    reply = await litellm.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="hi")
    await used(client, agent, reply.usage.total_tokens)
    assert callback.failures == 0


# -- LangChain ----------------------------------------------------------------


async def test_the_langchain_handler_charges_a_model_run(client: BudgetClient) -> None:
    agent = await funded(client, 1000)
    model = FakeMessagesListChatModel(
        responses=[
            AIMessage(
                content="hi",
                usage_metadata={
                    "input_tokens": 70,
                    "output_tokens": 5,
                    "total_tokens": 75,
                    "input_token_details": {"cache_read": 64},
                },
            )
        ]
    )
    await model.ainvoke("hello", config={"callbacks": [BudgetHandler(client, agent)]})
    await used(client, agent, 75)


async def test_the_langchain_handler_counts_a_run_without_usage_as_a_failure(
    client: BudgetClient,
) -> None:
    agent = await funded(client, 1000)
    handler = BudgetHandler(client, agent)
    model = FakeMessagesListChatModel(responses=[AIMessage(content="hi")])
    await model.ainvoke("hello", config={"callbacks": [handler]})
    assert handler.failures == 1
    assert (await client.get_budget(agent)).used_tokens == 0
