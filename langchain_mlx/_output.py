"""Engine results -> LangChain output fields. Pure: no mlx.

Token usage and response metadata are built here from the engine's `Final`
record, so the chat model and the LLM report them the same way.
"""

from __future__ import annotations

from typing import Any, Protocol

from langchain_core.messages.ai import UsageMetadata

PROVIDER = "mlx"


class FinalLike(Protocol):
    """The fields of `_engine.Final` this module reads."""

    @property
    def finish_reason(self) -> str: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def generation_tokens(self) -> int: ...
    @property
    def prompt_tps(self) -> float: ...
    @property
    def generation_tps(self) -> float: ...
    @property
    def time_to_first_token(self) -> float: ...
    @property
    def peak_memory_gb(self) -> float: ...
    @property
    def cached_tokens(self) -> int: ...


def usage_metadata(final: FinalLike) -> UsageMetadata:
    """Input/output/total tokens of one generation, and prompt tokens from cache."""
    usage = UsageMetadata(
        input_tokens=final.prompt_tokens,
        output_tokens=final.generation_tokens,
        total_tokens=final.prompt_tokens + final.generation_tokens,
    )
    if final.cached_tokens:
        usage["input_token_details"] = {"cache_read": final.cached_tokens}
    return usage


def response_metadata(final: FinalLike, model_name: str) -> dict[str, Any]:
    """What LangChain users read from `AIMessage.response_metadata`."""
    return {
        "model_name": model_name,
        "model_provider": PROVIDER,
        "finish_reason": final.finish_reason,
        "prompt_tokens_per_second": round(final.prompt_tps, 3),
        "generation_tokens_per_second": round(final.generation_tps, 3),
        "time_to_first_token_seconds": round(final.time_to_first_token, 4),
        "peak_memory_gb": round(final.peak_memory_gb, 4),
    }
