"""Where drafts come from and what a step costs: speculation's inputs.

`PromptLookup` (n-gram matches in the prompt and the output), `DraftModel`
(a small model's greedy continuation), `StepCosts` (measured seconds of a
step by the tokens it feeds, and the draft length that pays best), and the
per-request counters. Used by `speculative.Solo`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

NGRAM_SIZES = (4, 3)  # longest first; shorter matches in prose mostly miss
PRIOR_ACCEPTED, PRIOR_REJECTED = 2.0, 1.0  # a first draft is tried
DECAY = 0.8  # weight of the acceptance history per step
EXPLORE_EVERY = 32  # steps without a verified draft before a lookup match is tried
FIXED_EXTRA = 0.3  # unmeasured costs: each extra fed token, in one-token passes


@dataclass
class SpeculationStats:
    """Per request: tokens forced by the grammar, drafted, and accepted."""

    forced: int = 0
    drafted: int = 0
    accepted: int = 0


class StepCosts:
    """Measured seconds of a decode step by the number of tokens it feeds.

    With `measured=False` the costs follow a fixed model instead (a pass over
    n tokens costs `1 + FIXED_EXTRA * (n - 1)` one-token passes): every rank
    of a sharded model must choose the same draft lengths, and their clocks
    differ.
    """

    def __init__(self, *, measured: bool = True) -> None:
        self._seconds: dict[tuple[str, int], float] = {}
        self._measured = measured

    def record(self, source: str, n: int, seconds: float) -> None:
        """Note a step of `n` fed tokens with drafts from `source` ("": none)."""
        if not self._measured:
            return
        key = (source, n)
        old = self._seconds.get(key)
        self._seconds[key] = seconds if old is None else 0.7 * old + 0.3 * seconds

    def estimate(self, source: str, n: int) -> float | None:
        """Seconds for a step of `n` fed tokens, measured or guessed.

        A size just past the largest measured one is guessed optimistically,
        so it gets tried once; larger ones are not guessed.
        """
        if not self._measured:
            return 1.0 + FIXED_EXTRA * (n - 1)
        known = self._seconds.get((source, n)) or self._seconds.get(("", n))
        if known is not None:
            return known
        sizes = sorted(m for s, m in self._seconds if s in (source, "") and m < n)
        if not sizes or n > sizes[-1] + 1:
            return None
        base = self.estimate(source, sizes[-1])
        one = self.estimate("", 1) or base
        return None if base is None or one is None else base + 0.1 * one

    def best_draft(self, source: str, forced: int, limit: int, p: float) -> int:
        """The draft length with the most expected tokens per second."""
        base = self.estimate("", 1 + forced)
        if base is None:
            return 0
        best, best_rate = 0, (forced + 1) / base
        for k in range(1, limit + 1):
            cost = self.estimate(source, 1 + forced + k)
            if cost is None:
                break
            expected = forced + (1 - p ** (k + 1)) / (1 - p) if p < 1 else k + 1
            if expected / cost > best_rate:
                best, best_rate = k, expected / cost
        return best


class PromptLookup:
    """Drafts: what followed the latest earlier occurrence of the last n-gram."""

    def __init__(self) -> None:
        self._index: dict[int, dict[tuple[int, ...], int]] = {
            n: {} for n in NGRAM_SIZES
        }
        # the first n - 1 tokens of every indexed n-gram
        self._contexts: dict[int, set[tuple[int, ...]]] = {
            n: set() for n in NGRAM_SIZES
        }
        self._indexed = 0  # positions below this are in the index

    def draft(self, history: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens predicted to follow `history`."""
        end = len(history)
        # index the n-grams that end before position i, for every new i
        for i in range(max(self._indexed, min(NGRAM_SIZES)), end):
            for n, index in self._index.items():
                if i >= n:
                    index[tuple(history[i - n : i])] = i
                    self._contexts[n].add(tuple(history[i - n : i - 1]))
        self._indexed = max(self._indexed, end)
        if k <= 0:
            return []
        for n, index in self._index.items():
            if end < n:
                continue
            at = index.get(tuple(history[end - n :]))
            if at is not None and at < end:
                return list(history[at : at + k])
        return []

    def may_match(self, history: Sequence[int]) -> bool:
        """Whether `history` and one more token (any) can have a draft."""
        self.draft(history, 0)  # index what is new
        end = len(history)
        for n, contexts in self._contexts.items():
            if end < n:
                continue
            wanted = tuple(history[end - n + 1 :])
            # the n-gram ending at `end` is indexed once the next token is known
            if wanted in contexts or wanted == tuple(history[end - n : end - 1]):
                return True
        return False


class DraftModel:
    """Greedy drafts from a small model with the same tokenizer (its own cache).

    One per engine: its KV cache follows the latest sequence and is kept
    between requests, so an agent's next step (the same conversation, longer)
    reads only what is new, as the target model's prefix cache does. A long
    new prompt is read in chunks of `CATCH_UP` tokens, one chunk per step with
    no draft, so a step stays short (close, cancellation and admission wait
    for steps).
    """

    CATCH_UP = 256

    def __init__(self, model: Any) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.model = model
        self._cache = make_prompt_cache(model)
        self._tokens: list[int] = []  # what its cache holds
        self.caught_up = 0
        """Tokens the last draft first had to read (a new prompt: many)."""

    def draft(self, history: Sequence[int], k: int) -> list[int]:
        """`k` greedy tokens after `history` (its cache follows `history`).

        Empty while it is still reading a long new stretch of `history`.
        """
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        if k <= 0:
            return []
        same = 0
        limit = min(len(self._tokens), len(history) - 1)
        while same < limit and self._tokens[same] == history[same]:
            same += 1
        if same < len(self._tokens):
            extra = len(self._tokens) - same
            if trim_prompt_cache(self._cache, extra) != extra:  # not cut back:
                self._cache = make_prompt_cache(self.model)  # read it all again
                same = 0
            del self._tokens[same:]
        feed = list(history[same:])
        self.caught_up = len(feed)
        if len(feed) > self.CATCH_UP:  # a long new stretch: one chunk a step
            self.model(mx.array(feed[: self.CATCH_UP])[None], cache=self._cache)
            mx.eval([c.state for c in self._cache])
            self._tokens += feed[: self.CATCH_UP]
            return []
        out: list[int] = []
        for _ in range(k):
            logits = self.model(mx.array(feed)[None], cache=self._cache)
            self._tokens += feed
            token = int(mx.argmax(logits[0, -1]).item())  # type: ignore[arg-type]
            out.append(token)
            feed = [token]
        return out
