"""Facts about a loaded model and its folder that the engine decides by."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from langchain_mlx.engine.types import ContextWindowExceededError

_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "n_ctx",
                 "n_positions", "seq_length", "context_length",
                 "max_seq_len")  # fmt: skip
# Multimodal configs keep the language model's settings in a sub-config
# (Gemma 3: text_config).
_SUB_CONFIGS = ("text_config", "llm_config", "language_config")


def canonical_path(path: str) -> str:
    """One spelling per local folder (hub ids stay as they are)."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def context_length_of(model: Any) -> int | None:
    """The context window a model was trained for, from its arguments (if stated).

    mlx-lm keeps only the fields of the family's `ModelArgs`: many families
    have no context field there (prefer `context_length_in_folder`).
    """
    fields = _fields(getattr(model, "args", None))
    return None if fields is None else context_length_in_config(fields)


def context_length_in_config(config: Mapping[str, Any]) -> int | None:
    """The context window a `config.json` states, at its top or in a sub-config."""
    for key in _CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    for key in _SUB_CONFIGS:
        sub = _fields(config.get(key))
        if sub is not None and (found := context_length_in_config(sub)) is not None:
            return found
    return None


def _fields(args: Any) -> Mapping[str, Any] | None:
    """A config as a mapping: a dict, or a `ModelArgs` dataclass's fields."""
    if isinstance(args, Mapping):
        return args
    try:
        return dict(vars(args))
    except TypeError:  # None, a number, an object without __dict__
        return None


def context_length_in_folder(path: str) -> int | None:
    """The context window in a local model folder's config.json (None: not stated).

    Hub ids and folders without a readable config.json give None.
    """
    try:
        text = (Path(path).expanduser() / "config.json").read_text(encoding="utf-8")
        config = json.loads(text)
    except (OSError, ValueError):
        return None
    return context_length_in_config(config) if isinstance(config, Mapping) else None


def caches_can_be_cut(model: Any) -> bool:
    """Whether the model's KV caches can be trimmed back to a shorter prefix."""
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

    return bool(can_trim_prompt_cache(make_prompt_cache(model)))


def check_context(
    limit: int | None, name: str, prompt_tokens: int, max_tokens: int
) -> None:
    """Raise `ContextWindowExceededError` unless prompt + max_tokens fit `limit`."""
    if limit is None or prompt_tokens + max_tokens <= limit:
        return
    if prompt_tokens >= limit:
        advice = (
            "shorten the conversation (drop or summarise old turns, trim tool "
            "results, use fewer or smaller tools/schemas)"
        )
    else:
        advice = f"lower max_tokens to at most {limit - prompt_tokens}"
    msg = (
        f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
        f"{prompt_tokens + max_tokens} tokens do not fit the context window of "
        f"{name!r} ({limit} tokens); {advice}"
    )
    raise ContextWindowExceededError(msg)


def output_head(model: Any) -> Any:
    """The model's output layer if its logits are exactly `head(model.model(x))`.

    With it a forward pass computes logits only where they are used: a pass
    that feeds grammar-forced tokens needs them at its last position. The
    output layer is a large part of a small model (a fifth of SmolLM2-135M's
    weights, over a quarter of Qwen2.5-0.5B's). Checked on a probe token, so a
    family whose last step does more (logit scaling, soft-capping) keeps full
    passes. None when it cannot be split off.
    """
    import mlx.core as mx

    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if getattr(getattr(model, "args", None), "tie_word_embeddings", False):
        head = getattr(embed, "as_linear", None)
    else:
        head = getattr(model, "lm_head", None)
    if not callable(inner) or not callable(head):
        return None
    try:
        probe = mx.array([[0]])
        same = mx.array_equal(model(probe), head(inner(probe, cache=None)))
        return head if bool(same.item()) else None
    except Exception:  # another calling convention: keep full passes
        return None


def undo_room(cache: list[Any]) -> int | None:
    """How many tokens a pass may feed and still be taken back (None: any).

    A sliding-window (`RotatingKVCache`) layer can be cut back only while its
    offset stays below its window: feeding past it overwrites the oldest
    entries for good. Caches that cannot be trimmed at all allow none.
    """
    room: int | None = None
    for layer in cache:
        inner = getattr(layer, "caches", None)  # CacheList
        if inner is not None:
            here = undo_room(list(inner))
        elif not layer.is_trimmable():
            here = 0
        elif hasattr(layer, "max_size"):
            here = max(0, int(layer.max_size) - int(layer.offset) - 1)
        else:
            continue
        room = here if room is None else min(room, here if here is not None else room)
    return room


def cut_back(cache: list[Any], n: int) -> None:
    """Trim `n` tokens off every layer, or raise: the KV state must stay exact."""
    from mlx_lm.models.cache import trim_prompt_cache

    if n <= 0:
        return
    trimmed = trim_prompt_cache(cache, n)
    if trimmed != n:
        msg = (
            f"the KV cache could be cut back by {trimmed} of {n} tokens: it would "
            "keep tokens that were never decided (a sliding-window cache past "
            "its window)"
        )
        raise RuntimeError(msg)


def cache_length(cache: list[Any]) -> int | None:
    """Tokens the cache has been fed (None for caches that do not count them)."""
    for layer in cache:
        offset = getattr(layer, "offset", None)
        if isinstance(offset, int):
            return offset
    return None


def kv_bytes_per_token(model: Any) -> int:
    """KV-cache bytes per token of the whole model, from its configuration.

    The same on every rank (the configuration and the norms' dtype are; the
    weights are split), which makes it a rank-invariant unit for the prefix
    cache's budget; in one process it is what a cached token's KV state takes.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    config = _language_config(getattr(model, "args", None))
    layers = config.get("num_hidden_layers") or len(getattr(model, "layers", []) or [1])
    heads = config.get("num_attention_heads") or 1
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or (
        (config.get("hidden_size") or 64 * heads) // heads
    )
    parameters = getattr(model, "parameters", None)
    itemsize = next(  # the activations' dtype: the first floating parameter's
        (
            a.dtype.size
            for _, a in tree_flatten(parameters() if callable(parameters) else {})
            if mx.issubdtype(a.dtype, mx.floating)
        ),
        2,
    )
    return int(2 * layers * kv_heads * head_dim * itemsize)  # keys + values


def weight_bytes(model: Any) -> int | None:
    """Bytes of the model's weights (what a decode step reads), or None if unknown."""
    from mlx.utils import tree_flatten

    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return None
    return sum(a.nbytes for _, a in tree_flatten(parameters())) or None


def _language_config(args: Any) -> Mapping[str, Any]:
    """The language model's settings: the arguments, or their text sub-config."""
    fields = _fields(args) or {}
    if "num_hidden_layers" in fields:
        return fields
    for key in _SUB_CONFIGS:
        sub = _fields(fields.get(key))
        if sub is not None and "num_hidden_layers" in sub:
            return sub
    return fields
