"""Scoring answers without generating: next-token and sequence log-likelihoods.

What a decision needs from the model is a look at its distribution, not a
decoding loop. `score` runs on the engine's worker thread:

1. The shared prefix (the rendered state) is prefilled once, starting from the
   longest prefix the `PrefixCache` holds, and stored back, so the next
   decision on the same state reads it instead of computing it.
2. The questions (each its own suffix after the prefix) go through the model
   as one batch: the prefix KV state repeated along the batch axis, the
   suffixes right-padded. Causal attention keeps every real position from
   seeing the padding after it, so no mask is needed. The log-probabilities at
   each row's last real position are the answer-position distribution.
3. Continuations (answer labels, each a whole token sequence) are scored by
   teacher forcing, one batched pass per question: the question's own KV state
   (its row of the batch cut to its real length) repeated once per
   continuation, the continuations right-padded.

Caches other than plain `KVCache` (rotating windows, recurrent state) have no
batch layout this module knows: their rows run one at a time from copies.
Nothing here imports mlx at module level.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from langchain_mlx.engine.prefix_cache import PrefixCache

_PREFILL_STEP = 512
_MAX_ROWS = 8  # rows per forward pass: bounds the (rows, length, vocab) logits


@dataclass(frozen=True)
class ScoringQuestion:
    """One question: its tokens after the shared prefix, and what to score."""

    suffix: list[int]
    """Tokens after the shared prefix, up to the answer position (non-empty)."""
    candidates: list[int] = field(default_factory=list)
    """Token ids whose log-probability at the answer position is wanted."""
    continuations: list[list[int]] = field(default_factory=list)
    """Token sequences whose total log-probability from the answer position on
    is wanted (teacher forcing)."""


@dataclass(frozen=True)
class Scores:
    """What `score` measured, in the order of the questions given."""

    candidates: list[list[float]]
    """Per question: the log-probability of each candidate token."""
    continuations: list[list[float]]
    """Per question: the total log-probability of each continuation."""
    cached_tokens: int
    """Prefix tokens read from the prefix cache instead of computed."""


def score(
    model: Any,
    prefix_cache: PrefixCache,
    prefix: Sequence[int],
    questions: Sequence[ScoringQuestion],
) -> Scores:
    """Score `questions` after `prefix` (on the engine's worker thread)."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    for q in questions:
        if not q.suffix or not all(q.continuations):
            msg = (
                "each question needs at least one token after the shared prefix, "
                "and each continuation at least one token"
            )
            raise ValueError(msg)
    with mx.stream(generation_stream):
        base, cached = _prefilled(model, prefix_cache, list(prefix))
        batched = all(_plain_kv(layer) for layer in base)
        model = _Split.of(model)
        candidates: list[list[float]] = []
        continuations: list[list[float]] = []
        for start in range(0, len(questions), _MAX_ROWS):
            group = questions[start : start + _MAX_ROWS]
            rows = [q.suffix for q in group]
            outputs, cache_after = _run(model, base, rows, batched)
            for i, q in enumerate(group):
                last = model.log_probs(outputs[i][len(q.suffix) - 1])
                candidates.append(_pick(last, q.candidates))
                continuations.append(
                    _continuations(
                        model, cache_after(i), last, q.continuations, batched
                    )
                )
    return Scores(candidates, continuations, cached)


def _prefilled(
    model: Any, prefix_cache: PrefixCache, prefix: list[int]
) -> tuple[list[Any], int]:
    """The KV cache holding `prefix` (computed once, then kept by the prefix cache)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    # one more token: fetch always leaves one to prefill; this lets it reuse all
    cache, cached = prefix_cache.fetch([*prefix, 0]) if prefix else (None, 0)
    if cache is None:
        cache = make_prompt_cache(model)
    for begin in range(cached, len(prefix), _PREFILL_STEP):
        model(mx.array(prefix[begin : begin + _PREFILL_STEP])[None], cache=cache)
        mx.eval([c.state for c in cache])
    if cached < len(prefix):
        prefix_cache.store(prefix, cache, kind="assistant")
    return cache, cached


def _continuations(
    model: _Split,
    cache: list[Any],
    first: Any,
    sequences: list[list[int]],
    batched: bool,
) -> list[float]:
    """Total log-probability of each sequence after the state `cache` holds.

    `first` is the log-probability distribution at the answer position; the
    rest of each sequence is teacher-forced in one pass (`cache` repeated).
    """
    import mlx.core as mx

    if not sequences:
        return []
    totals = _pick(first, [s[0] for s in sequences])
    longer = [i for i, s in enumerate(sequences) if len(s) > 1]
    for start in range(0, len(longer), _MAX_ROWS):
        chosen = longer[start : start + _MAX_ROWS]
        rows = [sequences[i][:-1] for i in chosen]
        outputs, _ = _run(model, cache, rows, batched)
        for row, i in enumerate(chosen):
            following = sequences[i][1:]
            steps = model.log_probs(outputs[row][: len(following)])
            picked = steps[mx.arange(len(following)), mx.array(following)]
            totals[i] += float(picked.sum().item())
    return totals


def _run(
    model: _Split, base: list[Any], rows: list[list[int]], batched: bool
) -> tuple[list[Any], Callable[[int], list[Any]]]:
    """Outputs of each row after `base`, and the cache after row i (base + row i).

    Outputs are hidden states for `_Split.log_probs` (the head runs on the
    positions read only).

    Batched: `base` repeated per row, rows right-padded (with their last
    token; causal attention keeps real positions from seeing it).
    """
    import mlx.core as mx

    if not batched:
        out, caches = [], []
        for row in rows:
            cache = copy.deepcopy(base)
            out.append(model.body(mx.array(row)[None], cache)[0])
            caches.append(cache)
        return out, caches.__getitem__
    width = max(len(r) for r in rows)
    tokens = mx.array([r + [r[-1]] * (width - len(r)) for r in rows])
    cache = [_repeated(layer, len(rows)) for layer in base]
    outputs = model.body(tokens, cache)
    start = base[0].offset if base else 0

    def after(i: int) -> list[Any]:
        return [_row(layer, i, start + len(rows[i])) for layer in cache]

    return [outputs[i] for i in range(len(rows))], after


def _plain_kv(layer: Any) -> bool:
    from mlx_lm.models.cache import KVCache

    return type(layer) is KVCache


def _repeated(layer: Any, n: int) -> Any:
    """A `KVCache` holding `layer`'s tokens `n` times along the batch axis."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    out = KVCache()
    if layer.keys is not None and layer.offset:
        used = layer.offset
        out.keys = mx.repeat(layer.keys[..., :used, :], n, axis=0)
        out.values = mx.repeat(layer.values[..., :used, :], n, axis=0)
        out.offset = used
    return out


def _row(layer: Any, i: int, length: int) -> Any:
    """A `KVCache` of row `i` of a batched `layer`, its first `length` positions."""
    from mlx_lm.models.cache import KVCache

    out = KVCache()
    out.keys = layer.keys[i : i + 1, :, :length, :]
    out.values = layer.values[i : i + 1, :, :length, :]
    out.offset = length
    return out


class _Split:
    """A model as body (tokens -> hidden states) and head (hidden -> logits).

    The head over a whole vocabulary costs as much as several layers; a
    decision reads the logits of a few positions only. mlx-lm's models end
    `model.model(...)` and then `lm_head` or the tied embeddings; that split
    is checked once per model against `model(...)` itself, and a model whose
    check fails is run whole (the head then runs on every position).
    """

    _checked: ClassVar[dict[int, tuple[weakref.ref[Any], bool]]] = {}

    def __init__(self, model: Any, split: bool) -> None:
        self.model = model
        self.split = split

    @classmethod
    def of(cls, model: Any) -> _Split:
        known = cls._checked.get(id(model))
        if known is None or known[0]() is not model:
            known = (weakref.ref(model), cls._splits(model))
            cls._checked[id(model)] = known
        return cls(model, known[1])

    @staticmethod
    def _splits(model: Any) -> bool:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        try:
            probe = mx.array([[1, 2, 3]])
            whole = model(probe, cache=make_prompt_cache(model))
            parts = _head(model)(model.model(probe, make_prompt_cache(model)))
            return bool(mx.allclose(whole, parts, atol=1e-3, rtol=1e-3).item())
        except Exception:  # any other layout: run the model whole
            return False

    def body(self, tokens: Any, cache: list[Any]) -> Any:
        if self.split:
            return self.model.model(tokens, cache)
        return self.model(tokens, cache=cache)

    def log_probs(self, outputs: Any) -> Any:
        """Log-probabilities (float32) from `body` outputs of some positions."""
        import mlx.core as mx

        logits = _head(self.model)(outputs) if self.split else outputs
        x = logits.astype(mx.float32)
        return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _head(model: Any) -> Any:
    """The output layer of an mlx-lm model: `lm_head`, or the tied embeddings."""
    tied = getattr(model, "tie_word_embeddings", None)
    if tied is None:
        tied = getattr(getattr(model, "args", None), "tie_word_embeddings", True)
    if not tied and "lm_head" in model:
        return model.lm_head
    return model.model.embed_tokens.as_linear


def _pick(distribution: Any, ids: list[int]) -> list[float]:
    """The log-probabilities of `ids` in a (vocab,) distribution, as floats."""
    import mlx.core as mx

    if not ids:
        return []
    return [float(v) for v in distribution[mx.array(ids)].tolist()]
