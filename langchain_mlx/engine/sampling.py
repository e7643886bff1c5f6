"""Per-request sampling: mlx-lm's samplers and logits processors, seeded privately.

Seeds: a request with a `seed` samples from its own random key
(`mx.random.key(seed)`, split once per token exactly as MLX's global generator
is), so its output does not depend on what else is in the batch, and a solo
run matches `mlx_lm.generate` after `mx.random.seed(seed)`. Requests without a
seed share MLX's global generator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from langchain_mlx.engine.types import GenerationSettings, LogitsProcessor, Request

Sampler = Callable[[Any], Any]


def make_request_sampler(s: GenerationSettings) -> Sampler:
    """The request's sampler; with a seed, one that owns its random key."""
    from mlx_lm.sample_utils import greedy_sampler, make_sampler

    if s.temperature == 0:
        greedy: Sampler = greedy_sampler  # shared: a greedy batch samples at once
        return greedy
    if s.seed is None:
        sampler: Sampler = make_sampler(
            s.temperature,
            top_p=s.top_p,
            min_p=s.min_p,
            min_tokens_to_keep=s.min_tokens_to_keep,
            top_k=s.top_k,
        )
        return sampler
    return SeededSampler(s, s.seed)


class SeededSampler:
    """`make_sampler`'s chain (top_p, min_p, top_k, temperature) on a private key.

    The key is split once per decided token, whichever path decides it: a
    token forced by a grammar is not sampled, but `skip` advances the key as
    sampling it would have (the batch samples there, the only allowed token).
    """

    def __init__(self, s: GenerationSettings, seed: int) -> None:
        import mlx.core as mx

        self._settings = s
        self._key = mx.random.key(seed)
        self._inv_temp = 1.0 / s.temperature

    def __call__(self, logprobs: Any) -> Any:
        """One draw from the filtered, tempered distribution."""
        import mlx.core as mx
        from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

        s = self._settings
        self._key, sub = mx.random.split(self._key)  # as MLX's global generator
        if 0 < s.top_p < 1.0:
            logprobs = apply_top_p(logprobs, s.top_p)
        if s.min_p != 0.0:
            logprobs = apply_min_p(logprobs, s.min_p, s.min_tokens_to_keep)
        if s.top_k > 0:
            logprobs = apply_top_k(logprobs, s.top_k)
        return mx.random.categorical(logprobs * self._inv_temp, key=sub)

    def skip(self, n: int) -> None:
        """Advance the key past `n` tokens decided without sampling."""
        import mlx.core as mx

        for _ in range(n):
            self._key, _ = mx.random.split(self._key)


def skip_draws(sampler: Sampler, n: int) -> None:
    """Advance a seeded sampler past `n` forced tokens (others draw nothing)."""
    skip = getattr(sampler, "skip", None)
    if n and skip is not None:
        skip(n)


def request_processors(
    s: GenerationSettings, request: Request
) -> list[LogitsProcessor]:
    """Repetition penalties, the request's processors, then its grammar."""
    from mlx_lm.sample_utils import make_logits_processors

    penalties = make_logits_processors(
        None, s.repetition_penalty, s.repetition_context_size
    )
    constraint = [request.constraint] if request.constraint is not None else []
    return [*penalties, *request.logits_processors, *constraint]
