"""usage_from over the real response types of OpenAI, Anthropic, LiteLLM and
LangChain, built locally with their own pydantic models: no network."""

import os
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
from anthropic.types import (
    Message,
    RawContentBlockDeltaEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
)
from langchain_core.messages import AIMessage, AIMessageChunk
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
)

from token_budget.client import (
    BudgetClientError,
    Usage,
    UsageMissing,
    UsageUnrecognized,
    usage_from,
)

counts = st.integers(min_value=0, max_value=10**9)


# -- builders: the libraries' own types --------------------------------------


def chat_completion(usage: dict[str, Any] | None) -> ChatCompletion:
    return ChatCompletion.model_validate(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "hi"},
                }
            ],
            "usage": usage,
        }
    )


def chat_chunks(usage: dict[str, Any] | None, *, last_choices: bool = False) -> list[Any]:
    def chunk(choices: list[Any], usage: dict[str, Any] | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk.model_validate(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "gpt-4o",
                "choices": choices,
                "usage": usage,
            }
        )

    delta = [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]
    chunks = [chunk(delta), chunk(delta)]
    if usage is not None:
        # The usage chunk: choices empty (OpenAI) or not (other providers, #36168).
        chunks.append(chunk([{"index": 0, "delta": {}}] if last_choices else [], usage))
    return chunks


def response(usage: dict[str, Any] | None) -> Response:
    return Response.model_validate(
        {
            "id": "resp_1",
            "object": "response",
            "created_at": 1.0,
            "model": "gpt-4o",
            "output": [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": usage,
        }
    )


def responses_usage(
    input_tokens: int, output_tokens: int, cached: int = 0, reasoning: int = 0, writes: int = 0
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": writes},
        "output_tokens_details": {"reasoning_tokens": reasoning},
    }


def message(usage: dict[str, Any]) -> Message:
    return Message.model_validate(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "hi"}],
            "usage": usage,
        }
    )


def anthropic_events(start: dict[str, Any], *deltas: dict[str, Any]) -> list[Any]:
    events: list[Any] = [
        RawMessageStartEvent(type="message_start", message=message(start)),
        RawContentBlockDeltaEvent.model_validate(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "hi"},
            }
        ),
    ]
    for usage in deltas:
        events.append(
            RawMessageDeltaEvent.model_validate(
                {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}
            )
        )
    events.append(RawMessageStopEvent(type="message_stop"))
    return events


# -- OpenAI Chat Completions --------------------------------------------------


def test_a_chat_completion_charges_prompt_plus_completion() -> None:
    usage = usage_from(
        chat_completion({"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42})
    )
    assert usage == Usage(input_tokens=12, output_tokens=30)
    assert usage.tokens == 42


def test_openai_cached_and_reasoning_tokens_are_parts_not_added_again() -> None:
    usage = usage_from(
        chat_completion(
            {
                "prompt_tokens": 2000,
                "completion_tokens": 500,
                "total_tokens": 2500,
                "prompt_tokens_details": {"cached_tokens": 1920},
                "completion_tokens_details": {"reasoning_tokens": 448},
            }
        )
    )
    assert usage == Usage(2000, 500, cached_tokens=1920, reasoning_tokens=448)
    assert usage.tokens == 2500


def test_a_chat_stream_is_charged_with_the_usage_of_its_last_chunk() -> None:
    chunks = chat_chunks({"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13})
    assert usage_from(chunks) == Usage(9, 4)


def test_a_usage_chunk_with_choices_still_counts_its_cached_tokens() -> None:
    # LiteLLM #36168: usage dropped when the final chunk's choices is not empty.
    usage = {
        "prompt_tokens": 16111,
        "completion_tokens": 2,
        "total_tokens": 16113,
        "prompt_tokens_details": {"cached_tokens": 15872},
    }
    assert usage_from(chat_chunks(usage, last_choices=True)) == Usage(16111, 2, cached_tokens=15872)


def test_a_stream_read_from_a_generator_is_consumed_to_its_end() -> None:
    chunks = chat_chunks({"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11})
    assert usage_from(chunk for chunk in chunks).tokens == 11


def test_a_stream_without_include_usage_raises_usage_missing() -> None:
    with pytest.raises(UsageMissing, match="include_usage") as raised:
        usage_from(chat_chunks(None))
    assert raised.value.code == "usage_missing"
    assert isinstance(raised.value, BudgetClientError)


def test_a_chat_completion_without_usage_raises_usage_missing() -> None:
    with pytest.raises(UsageMissing):
        usage_from(chat_completion(None))


def test_an_empty_stream_raises_usage_missing() -> None:
    with pytest.raises(UsageMissing):
        usage_from([])


# -- OpenAI Responses API -----------------------------------------------------


def test_a_responses_api_response_counts_cached_and_reasoning_as_parts() -> None:
    usage = usage_from(response(responses_usage(1000, 300, cached=800, reasoning=200, writes=50)))
    assert usage == Usage(
        1000, 300, cached_tokens=800, reasoning_tokens=200, cache_creation_tokens=50
    )
    assert usage.tokens == 1300


def test_a_responses_stream_is_charged_from_its_completed_event() -> None:
    events = [
        ResponseCreatedEvent(type="response.created", sequence_number=0, response=response(None)),
        ResponseCompletedEvent(
            type="response.completed", sequence_number=5, response=response(responses_usage(7, 3))
        ),
    ]
    assert usage_from(events) == Usage(7, 3)
    assert usage_from(events[1]) == Usage(7, 3)


def test_a_responses_stream_cut_before_completion_raises_usage_missing() -> None:
    created = ResponseCreatedEvent(
        type="response.created", sequence_number=0, response=response(None)
    )
    with pytest.raises(UsageMissing):
        usage_from([created])


# -- Anthropic Messages -------------------------------------------------------


def test_an_anthropic_message_charges_input_plus_output() -> None:
    assert usage_from(message({"input_tokens": 25, "output_tokens": 80})) == Usage(25, 80)


def test_anthropic_cache_reads_and_writes_are_added_to_input_tokens() -> None:
    usage = usage_from(
        message(
            {
                "input_tokens": 50,
                "cache_read_input_tokens": 10_000,
                "cache_creation_input_tokens": 2_000,
                "output_tokens": 300,
                "output_tokens_details": {"thinking_tokens": 120},
            }
        )
    )
    assert usage == Usage(
        12_050, 300, cached_tokens=10_000, reasoning_tokens=120, cache_creation_tokens=2_000
    )
    assert usage.tokens == 12_350


def test_an_anthropic_stream_takes_input_from_start_and_output_from_the_last_delta() -> None:
    events = anthropic_events(
        {"input_tokens": 40, "cache_read_input_tokens": 100, "output_tokens": 1},
        {"output_tokens": 15},
        {"output_tokens": 64},
    )
    assert usage_from(events) == Usage(140, 64, cached_tokens=100)


def test_an_anthropic_delta_with_cumulative_input_replaces_the_start_counts() -> None:
    events = anthropic_events(
        {"input_tokens": 40, "output_tokens": 1},
        {"input_tokens": 45, "cache_creation_input_tokens": 5, "output_tokens": 9},
    )
    assert usage_from(events) == Usage(50, 9, cache_creation_tokens=5)


def test_an_anthropic_stream_without_message_start_raises_usage_missing() -> None:
    with pytest.raises(UsageMissing):
        usage_from(anthropic_events({"input_tokens": 1, "output_tokens": 1})[1:2])


# -- LiteLLM ------------------------------------------------------------------


def test_a_litellm_model_response_charges_prompt_plus_completion() -> None:
    reply = litellm.ModelResponse(
        usage=litellm.Usage(prompt_tokens=11, completion_tokens=22, total_tokens=33)
    )
    assert usage_from(reply) == Usage(11, 22)


def test_litellm_anthropic_cache_fields_are_not_added_to_its_prompt_tokens() -> None:
    # LiteLLM already folds Anthropic's cache reads and writes into prompt_tokens.
    reply = litellm.ModelResponse(
        usage=litellm.Usage(
            prompt_tokens=1_150,
            completion_tokens=20,
            total_tokens=1_170,
            cache_read_input_tokens=1_000,
            cache_creation_input_tokens=100,
        )
    )
    assert usage_from(reply) == Usage(1_150, 20, cached_tokens=1_000, cache_creation_tokens=100)


def test_litellm_reasoning_tokens_are_part_of_completion_tokens() -> None:
    reply = litellm.ModelResponse(
        usage=litellm.Usage(
            prompt_tokens=10, completion_tokens=90, total_tokens=100, reasoning_tokens=70
        )
    )
    assert usage_from(reply) == Usage(10, 90, reasoning_tokens=70)


def test_a_litellm_stream_is_charged_with_its_usage_chunk() -> None:
    chunks = [
        litellm.ModelResponseStream(choices=[{"index": 0, "delta": {"content": "hi"}}]),
        litellm.ModelResponseStream(
            choices=[],
            usage=litellm.Usage(prompt_tokens=8, completion_tokens=3, total_tokens=11),
        ),
    ]
    assert usage_from(chunks) == Usage(8, 3)


def test_a_litellm_stream_without_usage_raises_usage_missing() -> None:
    chunks = [litellm.ModelResponseStream(choices=[{"index": 0, "delta": {"content": "hi"}}])]
    with pytest.raises(UsageMissing):
        usage_from(chunks)


def test_a_litellm_response_without_usage_raises_usage_missing() -> None:
    with pytest.raises(UsageMissing):
        usage_from(litellm.ModelResponse())


# -- LangChain ----------------------------------------------------------------


def test_a_langchain_message_reads_usage_metadata_as_inclusive_totals() -> None:
    reply = AIMessage(
        content="hi",
        usage_metadata={
            "input_tokens": 350,
            "output_tokens": 240,
            "total_tokens": 590,
            "input_token_details": {"cache_read": 100, "cache_creation": 200},
            "output_token_details": {"reasoning": 200},
        },
    )
    assert usage_from(reply) == Usage(
        350, 240, cached_tokens=100, reasoning_tokens=200, cache_creation_tokens=200
    )


def test_langchain_message_chunks_add_their_usage_up() -> None:
    chunks = [
        AIMessageChunk(
            content="h",
            usage_metadata={"input_tokens": 30, "output_tokens": 0, "total_tokens": 30},
        ),
        AIMessageChunk(content="i"),
        AIMessageChunk(
            content="",
            usage_metadata={"input_tokens": 0, "output_tokens": 12, "total_tokens": 12},
        ),
    ]
    assert usage_from(chunks) == Usage(30, 12)


def test_a_langchain_message_without_usage_metadata_raises_usage_missing() -> None:
    with pytest.raises(UsageMissing):
        usage_from(AIMessage(content="hi"))


# -- anything else ------------------------------------------------------------


def test_raw_json_of_a_chat_completion_is_read_like_the_object() -> None:
    raw = {"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}
    assert usage_from(raw) == Usage(3, 4)


@pytest.mark.parametrize("thing", [None, 42, "text", object()])
def test_an_object_of_no_known_library_raises_usage_unrecognized(thing: object) -> None:
    with pytest.raises(UsageUnrecognized) as raised:
        usage_from(thing)
    assert raised.value.code == "usage_unrecognized"


def test_a_usage_refuses_negative_counts() -> None:
    with pytest.raises(ValueError, match="output_tokens"):
        Usage(1, -1)


# -- rules for all counts -----------------------------------------------------


@given(counts, counts, counts, counts, counts)
def test_tokens_is_input_plus_output_for_any_counts(
    input_tokens: int, output_tokens: int, cached: int, reasoning: int, writes: int
) -> None:
    usage = Usage(input_tokens, output_tokens, cached, reasoning, writes)
    assert usage.tokens == input_tokens + output_tokens


@given(counts, counts, counts, counts)
def test_openai_charges_prompt_plus_completion_whatever_is_cached(
    prompt: int, completion: int, cached: int, reasoning: int
) -> None:
    usage = usage_from(
        chat_completion(
            {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached},
                "completion_tokens_details": {"reasoning_tokens": reasoning},
            }
        )
    )
    assert usage.tokens == prompt + completion
    assert (usage.cached_tokens, usage.reasoning_tokens) == (cached, reasoning)


@given(counts, counts, counts, counts)
def test_anthropic_charges_every_input_kind_plus_output(
    input_tokens: int, reads: int, writes: int, output_tokens: int
) -> None:
    usage = usage_from(
        message(
            {
                "input_tokens": input_tokens,
                "cache_read_input_tokens": reads,
                "cache_creation_input_tokens": writes,
                "output_tokens": output_tokens,
            }
        )
    )
    assert usage.tokens == input_tokens + reads + writes + output_tokens


@given(st.lists(st.tuples(counts, counts), min_size=1, max_size=5))
def test_an_anthropic_stream_ends_with_its_last_cumulative_delta(
    deltas: list[tuple[int, int]],
) -> None:
    events = anthropic_events(
        {"input_tokens": 10, "output_tokens": 1},
        *({"input_tokens": i, "output_tokens": o} for i, o in deltas),
    )
    last_input, last_output = deltas[-1]
    assert usage_from(events) == Usage(last_input, last_output)


@given(st.lists(st.tuples(counts, counts), min_size=1, max_size=5))
def test_the_sum_of_usages_is_the_usage_of_the_calls_together(
    calls: list[tuple[int, int]],
) -> None:
    total = Usage(0, 0)
    for input_tokens, output_tokens in calls:
        total = total + Usage(input_tokens, output_tokens)
    assert total.tokens == sum(i + o for i, o in calls)
