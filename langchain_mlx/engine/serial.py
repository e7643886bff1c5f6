"""One sequence at a time, behind the `BatchGenerator` interface the engine uses.

mlx-lm's `BatchGenerator` merges the KV caches of a batch (`cache.merge`); a few
models build caches that cannot be merged (e.g. chunked attention). For those
the engine drives this class instead: same `insert` / `next` / `remove` calls,
same response records, same pipelining (the token a response carries has
already been fed to the model, so a finished sequence's cache holds exactly its
`all_tokens`). Sequences run in order of insertion; prefix caches, chunked
prefill, per-sequence samplers and logits processors work as in a batch.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any


@dataclass(eq=False)
class _Sequence:
    uid: int
    prompt: list[int]
    max_tokens: int
    cache: list[Any]
    tokens: list[int]  # what `cache` holds
    sampler: Any
    processors: tuple[Any, ...]
    matcher: Any
    total: int
    context: Any = None  # TokenBuffer for the processors, once generating
    pending: Any = None  # next token (lazy), once generating
    generated: int = 0


class SerialGenerator:
    """`BatchGenerator`'s engine-facing interface, decoding one sequence at a time."""

    def __init__(self, model: Any, *, prefill_step_size: int = 512) -> None:
        from mlx_lm.generate import generation_stream

        self.model = model
        self.prefill_step_size = prefill_step_size
        self.prefill_batch_size = 1
        self.completion_batch_size = 1
        self._stream = generation_stream
        self._queue: collections.deque[_Sequence] = collections.deque()
        self._uid = 0

    def insert(
        self,
        prompts: list[list[int]],
        max_tokens: list[int],
        caches: list[list[Any] | None],
        all_tokens: list[list[int]],
        samplers: list[Any],
        logits_processors: list[list[Any]],
        stop_sequences: list[Any],
    ) -> list[int]:
        """Queue sequences; returns their uids."""
        from mlx_lm.models.cache import make_prompt_cache

        uids = []
        for prompt, m, c, at, s, lp, stops in zip(
            prompts, max_tokens, caches, all_tokens, samplers, logits_processors,
            stop_sequences, strict=True,
        ):  # fmt: skip
            if not prompt:
                msg = "empty prompt"
                raise ValueError(msg)
            cache = c if c is not None else make_prompt_cache(self.model)
            seq = _Sequence(
                self._uid, list(prompt), m, cache, list(at), s, tuple(lp),
                stops.matcher(), len(prompt),
            )  # fmt: skip
            self._queue.append(seq)
            uids.append(self._uid)
            self._uid += 1
        return uids

    def next(self) -> tuple[list[Any], list[Any]]:
        """One prefill chunk or one token of the sequence at the front."""
        import mlx.core as mx

        if not self._queue:
            return [], []
        with mx.stream(self._stream):
            return self._next(self._queue[0])

    def _next(self, seq: _Sequence) -> tuple[list[Any], list[Any]]:
        import mlx.core as mx
        from mlx_lm.generate import GenerationBatch, PromptProcessingBatch
        from mlx_lm.models.cache import TokenBuffer

        if seq.pending is None and len(seq.prompt) > 1:  # prefill a chunk
            chunk = seq.prompt[: min(self.prefill_step_size, len(seq.prompt) - 1)]
            self.model(mx.array(chunk)[None], cache=seq.cache)
            mx.eval([c.state for c in seq.cache])
            seq.tokens += chunk
            seq.prompt = seq.prompt[len(chunk) :]
            progress = (seq.total - len(seq.prompt), seq.total)
            end = len(seq.prompt) == 1
            return [PromptProcessingBatch.Response(seq.uid, progress, end, False)], []
        if seq.pending is None:  # the last prompt token starts generation
            seq.context = TokenBuffer(seq.tokens)
            seq.pending = self._step(seq, mx.array(seq.prompt))
            done = (seq.total, seq.total)
            return [PromptProcessingBatch.Response(seq.uid, done, True, True)], []
        current = seq.pending
        seq.pending = self._step(seq, current)
        token = int(current.item())
        seq.generated += 1
        finish = "length" if seq.generated >= seq.max_tokens else None
        if seq.matcher.advance(token):
            finish = "stop"
        cache = None
        if finish is not None:
            self._queue.popleft()
            cache = seq.cache
        response = GenerationBatch.Response(
            seq.uid, token, None, finish, cache, seq.tokens if cache else None
        )
        return [], [response]

    def _step(self, seq: _Sequence, token: Any) -> Any:
        """Feed `token` (shape (1,)); return the next token, computing lazily."""
        import mlx.core as mx

        logits = self.model(token[None], cache=seq.cache)[:, -1, :]
        if seq.processors:
            context = seq.context.update_and_fetch(token)
            for processor in seq.processors:
                logits = processor(context, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        sampled = seq.sampler(logprobs)
        mx.async_eval(sampled)  # type: ignore[no-untyped-call]
        seq.tokens.append(int(token.item()))  # now in the cache
        return sampled

    def remove(
        self, uids: list[int], return_prompt_caches: bool = False
    ) -> dict[int, tuple[list[Any], list[int]]]:
        """Drop sequences; with `return_prompt_caches`, return their caches."""
        drop = set(uids)
        out = {s.uid: (s.cache, s.tokens) for s in self._queue if s.uid in drop}
        self._queue = collections.deque(s for s in self._queue if s.uid not in drop)
        return out if return_prompt_caches else {}

    def close(self) -> None:
        """Release every sequence."""
        self._queue.clear()
