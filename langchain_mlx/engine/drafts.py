"""Where drafts come from and what a step costs: speculation's inputs.

`PromptLookup` (n-gram matches in the prompt and the output), `DraftModel`
(a small model's greedy continuation), `StepCosts` (measured seconds of a
step by the tokens it feeds, and the draft length that pays best), and the
per-request counters. Used by `speculative.Solo`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

NGRAM_SIZES = (4, 3)  # longest first; shorter matches in prose mostly miss
PRIOR_ACCEPTED, PRIOR_REJECTED = 2.0, 1.0  # a first draft is tried
DECAY = 0.8  # weight of the acceptance history per step
EXPLORE_EVERY = 32  # steps without a verified draft before a lookup match is tried
FIXED_EXTRA = 0.3  # unmeasured costs: each extra fed token, in one-token passes
# a draft model's drafts must promise this many times the tokens per second of
# plain steps: its cost is partly a prior, and a tie is lost to noise
MODEL_MARGIN = 1.1
PAYBACK = 64  # tokens within which a draft model's catch-up must pay for itself
DRAFTER = "drafter"  # StepCosts' source for the draft model's own passes


@dataclass
class SpeculationStats:
    """Per request: tokens forced by the grammar, drafted, and accepted."""

    forced: int = 0
    drafted: int = 0
    accepted: int = 0


class StepCosts:
    """Measured seconds of a pass by the number of tokens it feeds.

    The target model's passes are keyed by where their draft came from
    ("": none, prefill chunks included; "lookup"; "model"), the draft model's
    own passes by `DRAFTER`. A size between two measured ones is interpolated,
    so the cost of verifying a draft is known from prefill before any draft.

    With `measured=False` the costs follow a fixed model instead (a pass over
    n tokens costs `1 + extra * (n - 1)` one-token passes, the draft model's
    its relative size times that): every rank of a sharded model must choose
    the same draft lengths, and their clocks differ.
    """

    def __init__(self, *, measured: bool = True, extra: float = FIXED_EXTRA) -> None:
        self._seconds: dict[tuple[str, int], float] = {}
        self._measured = measured
        self._extra = extra

    def record(self, source: str, n: int, seconds: float) -> None:
        """Note a pass of `n` fed tokens with drafts from `source` ("": none)."""
        if not self._measured:
            return
        key = (source, n)
        old = self._seconds.get(key)
        self._seconds[key] = seconds if old is None else 0.7 * old + 0.3 * seconds

    def estimate(self, source: str, n: int) -> float | None:
        """Seconds for a step of `n` fed tokens, measured or guessed.

        Between two measured sizes, interpolated. A size just past the
        largest measured one is guessed optimistically, so it gets tried
        once; larger ones are not guessed.
        """
        if not self._measured:
            return 1.0 + self._extra * (n - 1)
        known = self._seconds.get((source, n)) or self._seconds.get(("", n))
        if known is not None:
            return known
        lo, hi = _neighbours((m for s, m in self._seconds if s in (source, "")), n)
        if lo is not None and hi is not None:
            return _between(
                n, lo, hi, self.estimate(source, lo), self.estimate(source, hi)
            )
        if lo is None or n > lo + 1:
            return None
        base = self.estimate(source, lo)
        one = self.estimate("", 1) or base
        return None if base is None or one is None else base + 0.1 * one

    def drafter(self, n: int, size: float) -> float | None:
        """Seconds for the draft model to read `n` tokens (draft or catch up).

        Measured (interpolated; else the nearest measured size, scaled as
        the target's passes scale), else `size` (its bytes over the target's)
        times the target's pass.
        """
        known = self._seconds.get((DRAFTER, n))
        if known is not None:
            return known
        lo, hi = _neighbours((m for s, m in self._seconds if s == DRAFTER), n)
        if lo is not None and hi is not None:
            at_lo, at_hi = self._seconds[(DRAFTER, lo)], self._seconds[(DRAFTER, hi)]
            return _between(n, lo, hi, at_lo, at_hi)
        m = lo if lo is not None else hi
        if m is not None:  # scaled as the target's passes scale
            at_m, at_n = self.reading(m), self.reading(n)
            scale = at_n / at_m if at_m and at_n else n / m
            return self._seconds[(DRAFTER, m)] * scale
        target = self.reading(n)
        return None if target is None else size * target

    def reading(self, n: int) -> float | None:
        """Seconds for the target model to read `n` tokens in one pass.

        As `estimate("", n)`, and in proportion past the largest measured size
        (prefill is about linear in its tokens).
        """
        known = self.estimate("", n)
        if known is not None or not self._measured:
            return known
        lo, _ = _neighbours((m for s, m in self._seconds if s == ""), n)
        return None if lo is None else self._seconds[("", lo)] * n / lo

    def best_draft(
        self,
        source: str,
        forced: int,
        limit: int,
        p: float,
        *,
        per_token: float = 0.0,
        margin: float = 1.0,
    ) -> int:
        """The draft length with the most expected tokens per second.

        `per_token` is what drafting costs per drafted token (a draft model's
        pass; a lookup is free); a draft must promise `margin` times the rate
        of a step without one.
        """
        rates = self._rates(source, forced, limit, p, per_token)
        if not rates:
            return 0
        best, best_rate = 0, rates[0] * margin
        for k, rate in enumerate(rates[1:], 1):
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def saving(
        self, source: str, forced: int, k: int, p: float, *, per_token: float = 0.0
    ) -> float:
        """Seconds saved per decided token by drafting `k` (negative: lost)."""
        rates = self._rates(source, forced, k, p, per_token)
        if len(rates) <= k:
            return 0.0
        return 1 / rates[0] - 1 / rates[k]

    def _rates(
        self, source: str, forced: int, limit: int, p: float, per_token: float
    ) -> list[float]:
        """Expected tokens per second for drafts of 0, 1, ... up to `limit`."""
        base = self.estimate("", 1 + forced)
        if base is None:
            return []
        rates = [(forced + 1) / base]
        for k in range(1, limit + 1):
            cost = self.estimate(source, 1 + forced + k)
            if cost is None:
                break
            expected = forced + (1 - p ** (k + 1)) / (1 - p) if p < 1 else k + 1
            rates.append(expected / (cost + k * per_token))
        return rates


def _neighbours(sizes: Iterable[int], n: int) -> tuple[int | None, int | None]:
    """The largest of `sizes` below `n` and the smallest above it."""
    below = above = None
    for m in sizes:
        if m < n and (below is None or m > below):
            below = m
        elif m > n and (above is None or m < above):
            above = m
    return below, above


def _between(
    n: int, lo: int, hi: int, at_lo: float | None, at_hi: float | None
) -> float | None:
    """Linear interpolation at `n` of costs measured at sizes `lo` < n < `hi`."""
    if at_lo is None or at_hi is None:
        return None
    return at_lo + (at_hi - at_lo) * (n - lo) / (hi - lo)


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

    It is called only where `length` says its drafts pay, counting its own
    passes and what it must first catch up on: before it has run, its cost
    is its relative `size` times the target's measured passes.
    """

    CATCH_UP = 256

    def __init__(self, model: Any, costs: StepCosts, *, size: float = 1.0) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.model = model
        self.size = size
        """Its weights' bytes over the target's: its cost until it is measured."""
        self._costs = costs
        self._cache = make_prompt_cache(model)
        self._tokens: list[int] = []  # what its cache holds
        self.caught_up = 0
        """Tokens the last draft first had to read (a new prompt: many)."""
        self.seconds = 0.0
        """Time the last draft took (not the target's: verifying steps subtract it)."""

    def length(
        self, history: Sequence[int], forced: int, room: int, p: float, remaining: int
    ) -> int:
        """The draft length that pays after `history` (0: do not call it).

        Its passes cost per drafted token, and a stretch it has not read yet
        must pay for itself within the next `PAYBACK` tokens.
        """
        costs = self._costs
        per_token = costs.drafter(1, self.size)
        if per_token is None or room <= 0:
            return 0
        k = costs.best_draft(
            "model", forced, room, p, per_token=per_token, margin=MODEL_MARGIN
        )
        behind = self.lag(history) if k else 0
        if behind > 2:  # (a draft's first pass reads the last token or two)
            catch_up = costs.drafter(behind, self.size)
            saving = costs.saving("model", forced, k, p, per_token=per_token)
            if catch_up is None or saving * min(remaining, PAYBACK) < catch_up:
                return 0
        return k

    def lag(self, history: Sequence[int]) -> int:
        """Tokens it would read before drafting after `history`."""
        limit = min(len(self._tokens), len(history) - 1)
        if list(history[:limit]) == self._tokens[:limit]:  # the usual case
            return len(history) - limit
        same = 0
        while same < limit and self._tokens[same] == history[same]:
            same += 1
        return len(history) - same

    def draft(self, history: Sequence[int], k: int) -> list[int]:
        """`k` greedy tokens after `history` (its cache follows `history`).

        Empty while it is still reading a long new stretch of `history`.
        """
        import time

        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        self.seconds = 0.0
        if k <= 0:
            return []
        same = len(history) - self.lag(history)
        if same < len(self._tokens):
            extra = len(self._tokens) - same
            if trim_prompt_cache(self._cache, extra) != extra:  # not cut back:
                self._cache = make_prompt_cache(self.model)  # read it all again
                same = 0
            del self._tokens[same:]
        feed = list(history[same:])
        self.caught_up = len(feed)
        start = time.perf_counter()
        if len(feed) > self.CATCH_UP:  # a long new stretch: one chunk a step
            self.model(mx.array(feed[: self.CATCH_UP])[None], cache=self._cache)
            mx.eval([c.state for c in self._cache])
            self._tokens += feed[: self.CATCH_UP]
            self.seconds = time.perf_counter() - start
            self._costs.record(DRAFTER, self.CATCH_UP, self.seconds)
            return []
        out: list[int] = []
        for _ in range(k):
            tic = time.perf_counter()
            logits = self.model(mx.array(feed)[None], cache=self._cache)
            self._tokens += feed
            token = int(mx.argmax(logits[0, -1]).item())  # type: ignore[arg-type]
            self._costs.record(DRAFTER, len(feed), time.perf_counter() - tic)
            out.append(token)
            feed = [token]
        self.seconds = time.perf_counter() - start
        return out
