"""One request with the engine to itself: grammar fast-forward and speculation.

A local agent mostly sends one request at a time. While a request is alone,
the scheduler decodes it here instead of in mlx-lm's `BatchGenerator`, so a
step can feed the model several tokens at once:

    [pending] + forced + draft

- `pending` is the token sampled last (decided, not yet in the KV cache);
- `forced` are the tokens the request's grammar allows as the only
  continuation (llguidance's `compute_ff_tokens`: `{"name": "`, the rest of a
  tool name, `", "arguments": {"`, closing braces): taken as they are, like a
  prefill, instead of one decode step each. llguidance tokenizes forced text
  canonically, so greedy output can differ from token-by-token decoding only
  where the model would have spelt the same text with other tokens. The pass
  computes the output layer only from the last forced position on
  (`model_facts.output_head`), and a grammar that is complete forces the EOS
  too: the answer ends without a pass for it;
- `draft` are guessed next tokens: the continuation of the latest earlier
  occurrence of the output's last n-gram in the prompt or the output
  (prompt lookup), else the greedy continuation of a small draft model. A
  grammar first cuts the draft to what it accepts (`validate_tokens`).

One forward pass returns logits at every position; the request's processors
and sampler run on each in turn. A drafted token is kept while it equals the
token sampled there; the first mismatch is replaced by the sampled token (the
"bonus"), so every step decides at least one token and the rest of the draft
is trimmed from the KV cache. Drafts are deterministic (a lookup, or the draft
model's argmax), so "sample, then compare" is the standard acceptance rule:
greedy output is identical to plain decoding and sampled output keeps the
model's distribution.

How much to draft is decided per step from measurements, not fixed: the step
time for each number of fed tokens (`StepCosts`, per engine: on a CPU a
forward pass over 4 tokens costs twice one over 1; on a GPU nearly the same)
and the request's recent acceptance rate. The draft length that maximises
expected tokens per second wins, and 0 (no draft) when drafts do not pay, so
text that copies nothing is decoded as before. A draft model's own passes are
costs too: it is called only where its drafts pay counting them and what it
must first catch up on (`DraftModel.length`), before it has ever run from the
target's measured passes (prefill chunks included) scaled by its size. On a
CPU, where verifying k drafted tokens costs about k/3 more steps, a 0.5B model
drafting for a 1.5B one does not pay, and is not called. Where no draft could follow the
next token whatever it is (and no grammar needs its value), the step after it
is launched on its lazy array before it is read, as mlx-lm's decode loop does.

When a second request arrives the scheduler moves this one into the batch
(its cache, the tokens not yet in it, its remaining budget) and both decode
one token per step there: verifying drafts of different lengths in one batched
forward pass would need per-sequence cache trimming that mlx-lm's batch caches
do not have.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

from langchain_mlx.engine.drafts import (
    DECAY,
    EXPLORE_EVERY,
    PRIOR_ACCEPTED,
    PRIOR_REJECTED,
    DraftModel,
    PromptLookup,
    SpeculationStats,
    StepCosts,
)
from langchain_mlx.engine.model_facts import cache_length, cut_back, undo_room
from langchain_mlx.engine.sampling import skip_draws
from langchain_mlx.engine.types import Constraint, LogitsProcessor


def _records() -> tuple[Any, Any]:
    """mlx-lm's prompt and generation response types (what the scheduler reads)."""
    from mlx_lm.generate import GenerationBatch, PromptProcessingBatch

    return PromptProcessingBatch.Response, GenerationBatch.Response


class Solo:
    """One sequence: chunked prefill, then fast-forwarded / speculative steps.

    Speaks the scheduler's language: `next()` returns mlx-lm's prompt and
    generation response records (several tokens per step at most once each).
    """

    def __init__(
        self,
        model: Any,
        *,
        uid: int,
        prompt: Sequence[int],
        cache: list[Any],
        cached: int,
        max_tokens: int,
        sampler: Any,
        processors: Sequence[LogitsProcessor],
        stop_sequences: Any,
        constraint: Constraint | None,
        checkpoints: Sequence[int],
        fast_forward: bool,
        lookup: bool,
        num_draft_tokens: int,
        draft_model: DraftModel | None,
        costs: StepCosts,
        logprobs: bool,
        pipelined: bool = True,
        head: Callable[[], Any] | None = None,
    ) -> None:
        self.model = model
        # model_facts.output_head (probed at the first use): logits only where used
        self._head = head or (lambda: None)
        self._width = 0  # logits per position (known after the first pass)
        self.uid = uid
        self.cache = cache
        self.tokens = list(prompt[:cached])
        """What `cache` holds."""
        self.rest = list(prompt[cached:])
        """Decided tokens not yet in the cache (the last one is fed next)."""
        self.history = list(prompt)
        """Prompt and output so far (`tokens` + `rest`)."""
        self.total = len(prompt)
        self.max_tokens = max_tokens
        self.generated = 0
        self.sampler = sampler
        self.processors = list(processors)
        self._stops = stop_sequences.matcher()
        self._checkpoints = sorted(c for c in checkpoints if cached < c < self.total)
        self._constraint = constraint if fast_forward else None
        self._grammar = constraint
        self._lookup = PromptLookup() if lookup and num_draft_tokens else None
        self._draft_model = draft_model if num_draft_tokens else None
        self._max_draft = num_draft_tokens
        self._costs = costs
        self._logprobs = logprobs
        self._accepted = PRIOR_ACCEPTED
        self._rejected = PRIOR_REJECTED
        self.stats = SpeculationStats()
        self._plan: tuple[list[int], list[int], str] | None = None
        self._prepared: tuple[Any, Any, float] | None = None
        # the step after the launched one, launched on its still-lazy token
        self._chained: tuple[Any, Any, float] | None = None
        self.chained_steps = 0
        # a step's cost is the time between the ends of two steps: delivering
        # tokens overlaps a launched step, not a verifying one
        self._last_end: float | None = None
        self._since_draft = 0  # steps since a draft was last verified
        # a launched step that is undone has drawn from the sampler: only where
        # no seed promises the same draws as decoding alone
        self._pipelined = pipelined

    @property
    def fed(self) -> int:
        """Tokens the KV cache holds: `tokens`, and a launched step's pending one."""
        return len(self.tokens) + (self._prepared is not None)

    @property
    def remaining(self) -> int:
        """Tokens it may still generate."""
        return self.max_tokens - self.generated

    def next(self, prefill_step: int) -> tuple[list[Any], list[Any]]:
        """One prefill chunk, or one decode step (one or more tokens)."""
        import mlx.core as mx
        from mlx_lm.generate import generation_stream

        with mx.stream(generation_stream):
            if len(self.rest) > 1:
                return self._prefill(prefill_step), []
            return self._decode()

    def _prefill(self, step: int) -> list[Any]:
        import mlx.core as mx

        prompt_response, _ = _records()
        n = min(step, len(self.rest) - 1)
        ahead = [
            c - len(self.tokens) for c in self._checkpoints if c > len(self.tokens)
        ]
        n = min([n, *ahead])  # stop at a checkpoint: the scheduler keeps a copy
        chunk = self.rest[:n]
        tic = time.perf_counter()
        self.model(mx.array(chunk)[None], cache=self.cache)
        mx.eval([c.state for c in self.cache])
        # what verifying a draft would cost, known before any draft is made
        self._costs.record("", len(chunk), time.perf_counter() - tic)
        self.tokens += chunk
        del self.rest[: len(chunk)]
        done = self.total - len(self.rest)
        at_checkpoint = len(self.tokens) in self._checkpoints
        return [prompt_response(self.uid, (done, self.total), at_checkpoint, False)]

    def _decode(self) -> tuple[list[Any], list[Any]]:
        prompt_response, response = _records()
        starting = self.generated == 0
        if self._prepared is not None:
            decided, rows = self._take_prepared()
        else:
            decided, rows = self._verify()

        out: list[Any] = []
        if starting:
            out_prompt = [prompt_response(self.uid, (self.total,) * 2, True, True)]
        else:
            out_prompt = []
        for token, row in zip(decided, rows, strict=True):
            self.generated += 1
            self.history.append(token)
            finish = "length" if self.generated >= self.max_tokens else None
            if self._stops.advance(token):
                finish = "stop"
            done = finish is not None
            if done:
                self._unchain()  # the cache handed on holds `tokens`
            out.append(
                response(
                    self.uid, token, row, finish,
                    self.cache if done else None, self.tokens if done else None,
                )
            )  # fmt: skip
            if done:
                break
        self.rest = [decided[-1]] if len(out) == len(decided) else []
        self._last_end = time.perf_counter()
        if out[-1].finish_reason is not None:
            if self._grammar is not None:
                with contextlib.suppress(Exception):  # the scheduler asks: complete?
                    self._grammar.sync(self.history)
        else:
            self._plan_next()
        return out_prompt, out

    def _plan_next(self) -> None:
        """Decide the next step now; a plain one starts computing at once.

        Like mlx-lm's decode loop, a step that feeds just the pending token is
        launched before this step's tokens are delivered, so the model computes
        while the scheduler detokenizes and hands tokens to the reader.
        """
        import mlx.core as mx

        if self._chained is not None:  # already computing (see _take_prepared)
            self._prepared, self._chained = self._chained, None
            self._since_draft += 1
            self.chained_steps += 1
            return
        forced = self._forced()
        draft, source = self._draft(forced)
        if forced or draft or not self._pipelined or not self._can_undo(1):
            self._plan = (forced, draft, source)
            return
        self._prepared = self._launch(mx.array(self.rest[:1]), lambda: [self.history])

    def _launch(self, fed: Any, context: Callable[[], Any]) -> tuple[Any, Any, float]:
        """Start a one-token step feeding `fed` (an array, maybe not computed yet).

        `context()` is what the processors see: the tokens up to `fed`, whose
        last may be that same lazy array.
        """
        import mlx.core as mx

        logits = self.model(fed[None], cache=self.cache)[0]
        row = logits[-1][None]
        if self.processors:
            parts = [t if isinstance(t, mx.array) else mx.array(t) for t in context()]
            tokens = mx.concatenate(parts)
            for processor in self.processors:
                row = processor(tokens, row)
        logprobs = row - mx.logsumexp(row, axis=-1, keepdims=True)
        sampled = self.sampler(logprobs)
        mx.async_eval(sampled, logprobs)  # type: ignore[no-untyped-call]
        return sampled, logprobs[0], time.perf_counter()

    def _chainable(self) -> bool:
        """Whether the step after the launched one is plain, whatever its token.

        That is, one token fed and no draft worth verifying. Then it is launched
        at once on that token's lazy array, as mlx-lm's decode loop does, so the
        model never waits for Python between steps. Not with a grammar (its mask
        needs the token's value), a draft model's draft or a prompt-lookup draft that
        could be worth verifying after it (a draft model that does not pay
        does not stop it).
        """
        if (
            not self._pipelined
            or self._grammar is not None
            or self.remaining < 2  # the launched step's token may be the last
            or not self._can_undo(1)
        ):
            return False
        room = min(self._max_draft, self.remaining - 2)
        if self._draft_model is not None and self._draft_model.length(
            self.history, 0, room, self._acceptance(), self.remaining
        ):
            return False
        if self._lookup is None or room <= 0:
            return True
        if not self._lookup.may_match(self.history):
            return True
        if self._since_draft + 1 >= EXPLORE_EVERY:
            return False
        return self._costs.best_draft("lookup", 0, room, self._acceptance()) == 0

    def _can_undo(self, n: int) -> bool:
        """Whether a pass feeding `n` tokens could be taken back off the cache."""
        room = undo_room(self.cache)
        return room is None or room >= n

    def _unchain(self) -> None:
        """Undo the chained step (its token ended the sequence)."""
        if self._chained is not None:
            self._chained = None
            cut_back(self.cache, 1)

    def _take_prepared(self) -> tuple[list[int], list[Any]]:
        assert self._prepared is not None
        sampled, row, launched = self._prepared
        self._prepared = None
        if self._chainable():
            self._chained = self._launch(sampled, lambda: [self.history, sampled])
        token = int(sampled.item())
        self._costs.record("", 1, time.perf_counter() - (self._last_end or launched))
        self.tokens.append(self.rest[0])  # the pending token, fed by that step
        return [token], [row if self._logprobs else None]

    def settle(self) -> None:
        """Undo a launched step (before the cache is handed elsewhere).

        The cache then holds `tokens` again; the pending token stays pending.
        """
        assert self._chained is None  # (taken or undone within the step)
        if self._prepared is not None:
            self._prepared = None
            cut_back(self.cache, 1)

    def hand_off(self) -> None:
        """Leave the request's state at exactly its decided tokens, and check it.

        Before it decodes elsewhere (the batch): a launched step is undone, a
        planned one dropped, the grammar brought back to the decided tokens
        (validating a draft made it consume the planned forced tokens). Then
        the KV cache holds `tokens`, and `rest` the pending token.
        """
        self.settle()
        self._plan = None
        if self._grammar is not None:
            self._grammar.sync(self.history)
            consumed = getattr(self._grammar, "consumed", None)
            decided = len(self.history) - self.total
            if consumed is not None and consumed != decided:
                msg = f"the grammar is at {consumed} tokens, the request at {decided}"
                raise RuntimeError(msg)
        held = cache_length(self.cache)
        if held is not None and held != len(self.tokens):
            msg = f"the KV cache holds {held} tokens, the request {len(self.tokens)}"
            raise RuntimeError(msg)

    def _verify(self) -> tuple[list[int], list[Any]]:
        """Feed pending + forced + draft in one pass; keep what the model confirms."""
        import mlx.core as mx

        tic = self._last_end or time.perf_counter()
        if self._plan is not None:
            forced, draft, source = self._plan
            self._plan = None
        else:
            forced = self._forced()
            draft, source = self._draft(forced)
        if self._ends_with(forced) and (self._width or not self._logprobs):
            # the grammar ends here (forced EOS): the sequence is complete, no
            # logits are needed (the batch path would sample the EOS, the only
            # token allowed)
            self.stats.forced += len(forced)
            skip_draws(self.sampler, len(forced))  # the batch samples them
            return list(forced), [self._one_hot(t, self._width) for t in forced]
        pending = self.rest[0]
        fed = [pending, *forced, *draft]
        logits = self._logits(fed, len(forced))
        self._width = logits.shape[-1]
        decided = list(forced)
        rows: list[Any] = [self._one_hot(t, logits.shape[-1]) for t in forced]
        skip_draws(self.sampler, len(forced))  # the batch samples them
        context = [*self.history, *forced]
        for i in range(len(draft) + 1):
            row = logits[i][None]
            if self.processors:
                tokens = mx.array(context)
                for processor in self.processors:
                    row = processor(tokens, row)
            logprobs = row - mx.logsumexp(row, axis=-1, keepdims=True)
            token = int(self.sampler(logprobs).item())
            decided.append(token)
            rows.append(logprobs[0] if self._logprobs else None)
            if i == len(draft) or token != draft[i]:
                break
            context.append(token)
        accepted = len(decided) - len(forced) - 1
        rejected = len(draft) - accepted
        cut_back(self.cache, rejected)
        self.tokens += fed[: len(fed) - rejected]
        self._learn(len(draft), accepted)
        seconds = time.perf_counter() - tic
        if source == "model" and self._draft_model is not None:
            seconds -= self._draft_model.seconds  # (recorded as its own passes)
        self._costs.record(source, len(fed), seconds)
        self.stats.forced += len(forced)
        self.stats.drafted += len(draft)
        self.stats.accepted += accepted
        return decided, rows

    def _logits(self, fed: list[int], start: int) -> Any:
        """Feed `fed`; the logits from position `start` on (the rest are forced)."""
        import mlx.core as mx

        x = mx.array(fed)[None]
        head = self._head() if start else None
        if head is not None:
            hidden = self.model.model(x, cache=self.cache)
            return head(hidden[:, start:])[0]
        return self.model(x, cache=self.cache)[0, start:]

    def _ends_with(self, forced: list[int]) -> bool:
        """Whether the forced tokens end the sequence (at their last, not before)."""
        if not forced:
            return False
        stops = copy.copy(self._stops)  # a position in the automaton, not its trie
        ends = [stops.advance(t) for t in forced]
        return ends[-1] and not any(ends[:-1])

    def _forced(self) -> list[int]:
        """Grammar-forced tokens after the pending one (within the budget)."""
        if self._constraint is None:
            return []
        self._constraint.sync(self.history)
        forced = self._constraint.forced_tokens()
        return forced[: max(self.remaining - 1, 0)]

    def _draft(self, forced: list[int]) -> tuple[list[int], str]:
        """A draft worth verifying (maybe empty) and where it came from."""
        self._since_draft += 1
        room = min(self._max_draft, self.remaining - 1 - len(forced))
        undo = undo_room(self.cache)  # a rejected draft must be taken back
        if undo is not None:
            room = min(room, undo - 1 - len(forced))
        if room <= 0 or self._ends_with(forced):
            return [], ""
        history = [*self.history, *forced] if forced else self.history
        draft, source = [], ""
        if self._lookup is not None:
            draft, source = self._lookup.draft(history, room), "lookup"
        if not draft and self._draft_model is not None:
            # called only where its drafts pay, its own passes counted
            source, p = "model", self._acceptance()
            k = self._draft_model.length(history, len(forced), room, p, self.remaining)
            draft = self._draft_model.draft(history, k)
        if draft and self._grammar is not None:
            self._grammar.sync(history)
            draft = draft[: self._grammar.valid_prefix(draft)]
        if not draft:
            return [], ""
        k = self._costs.best_draft(source, len(forced), len(draft), self._acceptance())
        if not k and self._since_draft >= EXPLORE_EVERY:
            k = 1  # now and then: the text may have started to repeat
        if k:
            self._since_draft = 0
        return draft[:k], (source if k else "")

    def _acceptance(self) -> float:
        return self._accepted / (self._accepted + self._rejected)

    def _learn(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        self._accepted = DECAY * self._accepted + accepted
        self._rejected = DECAY * self._rejected + (accepted < drafted)

    def _one_hot(self, token: int, width: int) -> Any:
        """Log-probabilities of a forced token: the grammar left no choice."""
        if not self._logprobs:
            return None
        import mlx.core as mx

        return mx.where(mx.arange(width) == token, 0.0, -float("inf"))
