"""What an LLM call used, read from the response of the library that made it.

``usage_from(response)`` knows OpenAI (Chat Completions and the Responses
API), Anthropic Messages, LiteLLM and LangChain messages, whole or streamed,
by the attributes each documents: it imports none of them, so the base SDK
needs none. Each reports its counts its own way; ``Usage`` is one meaning:

- ``input_tokens`` is every prompt token, read from cache or not. OpenAI and
  LiteLLM count cached tokens inside ``prompt_tokens``; Anthropic's
  ``input_tokens`` EXCLUDES the cache reads and writes, which are added here.
- ``output_tokens`` is every completion token, reasoning included (all count).
- ``cached_tokens``, ``cache_creation_tokens`` and ``reasoning_tokens`` are
  parts of those two totals, for reports: never added to them again.

A response without usage (a stream without ``stream_options={"include_usage":
True}``, a cut-off stream) raises ``UsageMissing``: a call is never booked as
free because its count was not there.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UsageMissing, UsageUnrecognized

__all__ = ["Usage", "usage_from"]

_PARTS = ("cached_tokens", "reasoning_tokens", "cache_creation_tokens")
#: Events of the Responses API stream that carry the final ``response``.
_RESPONSE_DONE = ("response.completed", "response.incomplete", "response.failed")


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one call used; ``tokens`` is what the budget is charged."""

    input_tokens: int
    output_tokens: int
    #: Part of ``input_tokens`` read from the provider's prompt cache.
    cached_tokens: int = 0
    #: Part of ``output_tokens`` spent on reasoning (thinking).
    reasoning_tokens: int = 0
    #: Part of ``input_tokens`` written to the prompt cache.
    cache_creation_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("input_tokens", "output_tokens", *_PARTS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, not {value!r}")

    @property
    def tokens(self) -> int:
        """Prompt plus completion: the parts are inside these two already."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: "Usage") -> "Usage":
        """The usage of two calls together (an agent's turn of several calls)."""
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_tokens + other.cached_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.cache_creation_tokens + other.cache_creation_tokens,
        )


def usage_from(response: object) -> Usage:
    """The usage of ``response``: a response object, or a stream's chunks or events
    (a list or any iterable, read to its end).

    Raises ``UsageMissing`` if it carries none, ``UsageUnrecognized`` (a subclass)
    if it is nothing this function knows.
    """
    if isinstance(response, Usage):
        return response
    found = _single(response)
    if found is not None:
        return found
    if _has(response, "usage") or _has(response, "usage_metadata"):
        raise UsageMissing(f"{type(response).__name__} carries no usage")
    if isinstance(response, Iterable) and not isinstance(response, str | bytes | Mapping):
        return _stream(response)
    raise UsageUnrecognized(
        f"cannot read usage from a {type(response).__name__}: pass an OpenAI, Anthropic, "
        "LiteLLM or LangChain response, or a stream's chunks"
    )


def _single(item: object) -> Usage | None:
    """The usage one object carries, or None: through ``usage``, LangChain's
    ``usage_metadata``, or the ``message``/``response`` an event wraps."""
    metadata = _get(item, "usage_metadata")
    if metadata is not None:
        return _langchain(metadata)
    usage = _get(item, "usage")
    if usage is not None:
        return _read(usage)
    for wrapped in ("message", "response"):
        inner = _get(item, wrapped)
        if inner is not None and not isinstance(inner, str):
            found = _single(inner)
            if found is not None:
                return found
    return None


def _stream(items: Iterable[Any]) -> Usage:
    """The last usage a stream reported. OpenAI and LiteLLM send it in the last
    chunk (whatever its ``choices``); Anthropic in ``message_start``, then
    cumulative counts in each ``message_delta``, which replace the start's;
    LangChain's chunks each carry a part, which add up."""
    found: Usage | None = None
    anthropic: dict[str, Any] | None = None
    seen = 0
    for item in items:
        seen += 1
        kind = _get(item, "type")
        if _get(item, "usage_metadata") is not None:
            # LangChain's message chunks each carry their part: they add up.
            part = _single(item)
            found = part if found is None or part is None else found + part
        elif kind == "message_start" or (kind == "message_delta" and anthropic is not None):
            usage = _get(_get(item, "message"), "usage") or _get(item, "usage")
            fields = _fields(usage, _ANTHROPIC_FIELDS)
            anthropic = fields if kind == "message_start" else {**(anthropic or {}), **fields}
            found = _anthropic(anthropic)
        elif isinstance(kind, str) and kind.startswith("response.") and kind not in _RESPONSE_DONE:
            continue  # created / in_progress carry a response without usage yet
        else:
            found = _single(item) or found
    if found is None:
        raise UsageMissing(
            f"the stream's {seen} chunks carried no usage: OpenAI and LiteLLM send it only "
            'with stream_options={"include_usage": True}, in the last chunk; read the '
            "stream to its end"
        )
    return found


_ANTHROPIC_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "output_tokens_details",
)


def _read(usage: object) -> Usage:
    """One usage object, told apart by the field names each library documents."""
    if _get(usage, "prompt_tokens") is not None:
        return _chat_completions(usage)
    if _get(usage, "input_tokens_details") is not None:
        return _responses(usage)
    if _get(usage, "input_tokens") is not None:
        return _anthropic(_fields(usage, _ANTHROPIC_FIELDS))
    raise UsageMissing(f"a usage without token counts: {usage!r:.200}")


def _chat_completions(usage: object) -> Usage:
    # OpenAI Chat Completions and LiteLLM (which maps every provider to it):
    # prompt_tokens includes cached_tokens and cache writes, completion_tokens
    # includes reasoning_tokens.
    prompt = _get(usage, "prompt_tokens_details")
    writes = (
        _int(prompt, "cache_write_tokens")
        or _int(prompt, "cache_creation_tokens")
        or _int(usage, "cache_creation_input_tokens")
    )
    return Usage(
        input_tokens=_int(usage, "prompt_tokens"),
        output_tokens=_int(usage, "completion_tokens"),
        cached_tokens=_int(prompt, "cached_tokens"),
        reasoning_tokens=_int(_get(usage, "completion_tokens_details"), "reasoning_tokens"),
        cache_creation_tokens=writes,
    )


def _responses(usage: object) -> Usage:
    # OpenAI Responses API: the same inclusive totals under other names.
    details = _get(usage, "input_tokens_details")
    return Usage(
        input_tokens=_int(usage, "input_tokens"),
        output_tokens=_int(usage, "output_tokens"),
        cached_tokens=_int(details, "cached_tokens"),
        reasoning_tokens=_int(_get(usage, "output_tokens_details"), "reasoning_tokens"),
        cache_creation_tokens=_int(details, "cache_write_tokens"),
    )


def _anthropic(usage: Mapping[str, Any]) -> Usage:
    # Anthropic: input_tokens are only the tokens after the last cache
    # breakpoint; the total input is input + cache reads + cache writes.
    reads = _int(usage, "cache_read_input_tokens")
    writes = _int(usage, "cache_creation_input_tokens")
    return Usage(
        input_tokens=_int(usage, "input_tokens") + reads + writes,
        output_tokens=_int(usage, "output_tokens"),
        cached_tokens=reads,
        reasoning_tokens=_int(usage.get("output_tokens_details"), "thinking_tokens"),
        cache_creation_tokens=writes,
    )


def _langchain(metadata: object) -> Usage:
    # LangChain's UsageMetadata: input_tokens is the sum of every input type.
    if _get(metadata, "input_tokens") is None:
        raise UsageMissing(f"usage_metadata without input_tokens: {metadata!r:.200}")
    details = _get(metadata, "input_token_details")
    return Usage(
        input_tokens=_int(metadata, "input_tokens"),
        output_tokens=_int(metadata, "output_tokens"),
        cached_tokens=_int(details, "cache_read"),
        reasoning_tokens=_int(_get(metadata, "output_token_details"), "reasoning"),
        cache_creation_tokens=_int(details, "cache_creation"),
    )


def _fields(usage: object, names: Iterable[str]) -> dict[str, Any]:
    """The fields of ``usage`` that are set (a delta leaves the others None)."""
    return {name: value for name in names if (value := _get(usage, name)) is not None}


def _has(obj: object, name: str) -> bool:
    return name in obj if isinstance(obj, Mapping) else hasattr(obj, name)


def _get(obj: object, name: str) -> Any:
    """An attribute, or a key of a mapping (raw JSON, LangChain's TypedDicts)."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _int(obj: object, name: str) -> int:
    """A count; absent is 0, for the parts and for totals a library leaves out
    (an embedding has no completion tokens)."""
    value = _get(obj, name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageMissing(f"{name} is not a token count: {value!r:.100}")
    return value
