"""Sampling settings: one frozen record resolved from every place a user sets them.

Three layers, later wins: `MLXPipeline.pipeline_kwargs` (the community names,
e.g. `temp`), the LangChain standard fields of `ChatMLX` (`temperature`,
`max_tokens`, ...), and the keyword arguments of one call. Unknown names are
rejected here, with the list of names we accept, so nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.language_models import LangSmithParams
from pydantic import BaseModel, Field

from langchain_mlx.engine.types import (
    DEFAULT_MAX_TOKENS,
    SETTING_NAMES,
    GenerationSettings,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "GenerationSettings",
    "SamplingFields",
    "call_settings",
    "canonical_settings",
]

# community / mlx-lm name -> our field name
_ALIASES = {
    "temp": "temperature",
    "max_new_tokens": "max_tokens",
    "stop_sequences": "stop",
}
_REMOVED = {
    "formatter": (
        "'formatter' was removed from mlx-lm's generate(); stream the model "
        "(chat.stream / llm.stream) and format the chunks yourself"
    ),
}
# community flag that made mlx-lm print to stdout; the library logs instead
# (response_metadata carries the speeds it printed)
_IGNORED = {"verbose"}


def canonical_settings(raw: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """Map user-facing names (community and LangChain) to `GenerationSettings` names.

    Raises:
        ValueError: for a name we do not know, saying where it came from and
            which names are accepted.

    """
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _REMOVED:
            msg = f"{where}: {_REMOVED[key]}."
            raise ValueError(msg)
        if key in _IGNORED:
            continue
        name = _ALIASES.get(key, key)
        if name not in SETTING_NAMES:
            accepted = sorted(SETTING_NAMES | set(_ALIASES))
            msg = (
                f"{where}: unknown generation setting {key!r}. "
                f"Accepted: {', '.join(accepted)}."
            )
            raise ValueError(msg)
        out[name] = value
    return out


def call_settings(
    defaults: GenerationSettings,
    fields: Mapping[str, Any],
    kwargs: Mapping[str, Any],
    stop: list[str] | None,
) -> GenerationSettings:
    """One call's settings: defaults, then the model's fields, then the call's.

    `kwargs` may carry the community's `pipeline_kwargs` / `model_kwargs` dicts.
    """
    per_call: dict[str, Any] = {}
    rest = dict(kwargs)
    for legacy in ("pipeline_kwargs", "model_kwargs"):  # community names
        per_call.update(rest.pop(legacy, None) or {})
    per_call.update(rest)
    settings = defaults.with_overrides(fields).with_overrides(
        canonical_settings(per_call, where="ChatMLX call")
    )
    return settings if stop is None else settings.with_overrides({"stop": stop})


class SamplingFields(BaseModel):
    """The LangChain-standard sampling fields of `ChatMLX` (None: not set here)."""

    temperature: float | None = Field(default=None, ge=0)
    """Sampling temperature; 0 is greedy. Overrides `pipeline_kwargs["temp"]`."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Most tokens to generate (default 256)."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens with this probability."""
    top_k: int | None = Field(default=None, ge=0)
    """Keep only the k most likely tokens (0: off)."""
    min_p: float | None = Field(default=None, ge=0, le=1)
    """Drop tokens below this fraction of the top token's probability."""
    repetition_penalty: float | None = Field(default=None, gt=0)
    """Multiplicative penalty for recently generated tokens (1.0: off)."""
    repetition_context_size: int | None = Field(default=None, ge=1)
    """How many recent tokens the repetition penalty looks at (default 20)."""
    seed: int | None = None
    """Random seed for sampling, for reproducible non-greedy output."""
    stop: list[str] | None = None
    """Stop strings: generation ends before the first one; it is never returned."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds one generation may take; past it the call raises `TimeoutError`."""
    logprobs: bool | None = None
    """Return each token's log-probability in `response_metadata["logprobs"]`
    (OpenAI's shape: `{"content": [{"token", "logprob", "bytes",
    "top_logprobs"}, ...]}`), on invoke and on every stream chunk."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """With `logprobs`, also the N likeliest tokens at each position (0-20)."""

    fast_forward: bool | None = None
    """Feed tokens a grammar forces (tool-call and JSON syntax, known keys) in
    one forward pass instead of one decode step each (default on). Greedy
    output is unchanged except that forced text is tokenized canonically."""
    prompt_lookup: bool | None = None
    """Speculative decoding from the prompt: draft the next tokens from n-gram
    matches in the prompt and the output, verify them in one forward pass
    (default on). Greedy output is identical; sampled output keeps the model's
    distribution. Drafts shrink or stop where they are rejected."""
    num_draft_tokens: int | None = Field(default=None, ge=0)
    """Most tokens drafted per step (default 6; 0 turns speculation off)."""

    def sampling_overrides(self) -> dict[str, Any]:
        """The fields that are set, by `GenerationSettings` name."""
        names = SamplingFields.model_fields
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def ls_params(
    model: str,
    settings: GenerationSettings,
    stop: list[str] | None,
    kwargs: Mapping[str, Any],
) -> LangSmithParams:
    """LangSmith's tracing parameters of a chat call (per-call values first)."""
    params = LangSmithParams(
        ls_provider="mlx",
        ls_model_name=str(kwargs.get("model") or model),
        ls_model_type="chat",
        ls_temperature=kwargs.get("temperature", settings.temperature),
        ls_max_tokens=kwargs.get("max_tokens", settings.max_tokens),
    )
    ls_stop = stop or kwargs.get("stop") or list(settings.stop)
    if ls_stop:
        params["ls_stop"] = ls_stop
    return params
