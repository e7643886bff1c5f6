"""Continuous batching: every live request of a model in one decode loop.

`Scheduler` runs on the engine's worker thread. Each `step()`:

1. admits waiting requests while fewer than `max_batch_size` are live: looks up
   the longest cached prefix (`PrefixCache.fetch`) and inserts the rest of the
   prompt into mlx-lm's `BatchGenerator` with the request's own sampler, logits
   processors, max_tokens and EOS ids. Requests that start the same way
   (parallel branches of an agent share its whole history; a batch shares a
   system prompt and tools) prefill that start once: a newcomer whose uncached
   start another prompt in prefill covers waits for that prefill (the
   provider's KV cache is stored when its prompt is done) and then reuses it;
   newcomers that share a start among themselves get a one-token job that
   prefills it;
2. drops cancelled and timed-out requests at once (`BatchGenerator.remove`);
3. runs `BatchGenerator.next()`: one decode step for every generating request
   and one prefill chunk for the newcomers, sized from the measured prefill
   speed to take about `STEP_SECONDS`, so a long prompt never holds the running
   streams (or a `close()`) for longer than that;
4. hands each new token to the request's `RequestText` (detokenizer, stop
   strings, reasoning and tool-call routing, log-probabilities) and finishes
   requests, keeping their KV caches in the prefix cache.

Failures stay with their request: a logits processor, sampler, detokenizer or
cache store that raises ends that request with its own error (typed errors of
ours as they are, anything else as `RequestFailedError`); the batch goes on.
Only a failure of the batch step itself fails every request in it.

A request that has the engine to itself is decoded by `speculative.Solo`
instead (grammar fast-forward and speculative decoding feed several tokens per
forward pass); when another request arrives it moves into the batch with its
cache and decodes one token per step there. Models whose caches cannot be
merged into a batch get `SerialGenerator`, the same interface one sequence at
a time.

Sampling (with per-request seeds) is in `sampling.py`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from langchain_mlx.engine.drafts import DraftModel, StepCosts
from langchain_mlx.engine.guards import (
    copy_error,
    guarded,
    guarded_sampler,
    request_error,
    timeout_error,
)
from langchain_mlx.engine.handle import RequestHandle
from langchain_mlx.engine.live import Live, final_event, finish_reason
from langchain_mlx.engine.model_facts import (
    kv_bytes_per_token,
    output_head,
    undo_room,
    weight_bytes,
)
from langchain_mlx.engine.prefix_cache import (
    PrefixCache,
    common_length,
    shared_prefixes,
)
from langchain_mlx.engine.sampling import (
    Sampler,
    make_request_sampler,
    request_processors,
)
from langchain_mlx.engine.speculative import Solo
from langchain_mlx.engine.text import RequestText, token_logprob
from langchain_mlx.engine.types import (
    LogitsProcessor,
    Request,
    RequestFailedError,
)

logger = logging.getLogger(__name__)


# A prefill step is sized from the measured prefill speed to take about this
# long, so live streams keep flowing and close()/Ctrl-C wait at most one step.
STEP_SECONDS = 0.25
PREFILL_MIN, PREFILL_MAX = 8, 512  # prompt tokens per step
SOLO_PREFILL_STEPS = 4  # a lone request's prefill step: as long as 4 batch steps
SHARED_PREFIX_MIN = 16  # tokens worth prefilling once for several requests
KV_STEP = 256  # mlx-lm's KV caches grow by this many positions


class Scheduler:
    """Admission, the decode loop and delivery of events for one model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        eos_ids: Sequence[int],
        prefix_cache: PrefixCache,
        on_done: Callable[[str], None],
        max_batch_size: int,
        batched: bool | None = None,
        draft_model: Any = None,
        measured_costs: bool = True,
        split_head: bool = True,
    ) -> None:
        from mlx_lm.generate import StopSequences
        from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

        self._model = model
        self._tokenizer = tokenizer
        self._eos_ids = frozenset(eos_ids)
        self._eos_stops = StopSequences([(t,) for t in sorted(self._eos_ids)])
        self._prefix = prefix_cache
        self._on_done = on_done
        self._max_batch_size = max_batch_size
        if batched is None:
            batched = all(hasattr(c, "merge") for c in make_prompt_cache(model))
        self.batched = batched
        """Whether requests share one batch (False: one at a time, in order)."""
        self._share_prefixes = batched and can_trim_prompt_cache(
            make_prompt_cache(model)
        )
        # tokens a fresh cache can take and still cut back (sliding windows)
        self._undo_limit = undo_room(make_prompt_cache(model))
        self._generator: Any = None  # a SequenceGenerator (types.py)
        self._waiting: collections.deque[Live] = collections.deque()
        self._live: dict[int, Live] = {}
        self._jobs: set[int] = set()  # one-token sequences filling a shared prefix
        self._providers: dict[int, list[int]] = {}  # uid -> tokens others await
        self.largest_batch = 0
        """The most requests live at once so far."""
        self._prefill_chunk = 16  # until the first prefill step is measured
        self._rate: float | None = None
        self._progress: dict[int, int] = {}
        self._solo: Solo | None = None
        self._solo_uids = -1  # solo uids count down: never a batch uid
        self._costs = StepCosts(measured=measured_costs)
        self._head: Any = None  # model_facts.output_head, at the first forced pass
        self._head_probed = not split_head
        self.draft_model = draft_model
        """A small model with the same tokenizer that drafts tokens, or None."""
        self._draft: DraftModel | None = None  # its drafter, cache kept
        self.kv_budget: int | None = None
        """Bytes of KV memory running requests and the prefix cache may hold."""
        self._token_bytes = kv_bytes_per_token(model)

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or live."""
        return bool(self._waiting or self._live or self._jobs)

    @property
    def max_batch_size(self) -> int:
        """Most requests decoded together."""
        return self._max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, n: int) -> None:
        self._max_batch_size = n
        if self._generator is not None and self.batched:
            self._generator.completion_batch_size = n
            self._generator.prefill_batch_size = n

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens per prefill step (sized from the measured speed)."""
        return self._prefill_chunk

    @prefill_chunk.setter
    def prefill_chunk(self, n: int) -> None:
        self._prefill_chunk = n

    @property
    def solo_prefill_chunk(self) -> int:
        """Prompt tokens per prefill step of a lone request.

        Nothing else waits on it but a `close()`, so its steps are longer
        (~1 s): prefill runs faster in larger chunks (Qwen2.5-0.5B on a CPU:
        5-8% from 8 to 64 tokens).
        """
        return min(PREFILL_MAX, SOLO_PREFILL_STEPS * self._prefill_chunk)

    def add(
        self,
        handle: RequestHandle,
        request: Request,
        submitted: float,
        number: int,
    ) -> None:
        """Queue a request; it joins the batch when a slot is free."""
        if not self.busy:
            import mlx.core as mx

            mx.reset_peak_memory()  # peak memory is reported per busy period
        self._waiting.append(Live(handle, request, submitted, number))

    def step(
        self,
        gone: dict[int, str] | None = None,
        agree: Callable[[int], None] | None = None,
    ) -> None:
        """Admit, sweep, advance the batch by one step, deliver events.

        `gone` (submission number -> "cancelled" or "timeout") decides which
        requests to drop instead of this process's handles and clock: the
        ranks of a sharded model drop what rank 0 decided. `agree(digest)`
        runs before the forward pass (the ranks check they decided alike).
        """
        self._admit()
        self._sweep(self.gone() if gone is None else gone)
        if agree is not None:
            agree(self.digest())
        if self._solo is not None:
            self._step_solo(self._solo)
            return
        if not self._live and not self._jobs:
            return
        generator = self._ensure_generator()
        generator.prefill_step_size = self._prefill_chunk
        tic = time.perf_counter()
        try:
            prompt_responses, responses = generator.next()
        except Exception as e:  # the batch is unusable: fail its requests
            logger.debug("batch step failed", exc_info=True)
            error = RequestFailedError(f"the batch step failed: {e}")
            error.__cause__ = e
            self.fail_all(error)
            return
        self._measure_prefill(prompt_responses, time.perf_counter() - tic)
        for p in prompt_responses:
            if p.end_of_prompt and p.uid in self._live:
                self._live[p.uid].decoding = True
            elif p.end_of_segment and p.uid in self._live:
                self._keep_checkpoint(p.uid)
            if p.end_of_prompt and p.uid in self._providers:
                self._provide(p.uid)
        to_remove: list[Live] = []
        for r in responses:
            live = self._live.get(r.uid)
            if live is not None:
                self._on_token(live, r, to_remove)
            elif r.finish_reason is not None:
                self._jobs.discard(r.uid)
        self._remove(to_remove)

    def _measure_prefill(self, prompt_responses: list[Any], seconds: float) -> None:
        """Size the next prefill step from this one's speed (prompt tokens/s)."""
        tokens = 0
        for p in prompt_responses:
            done = p.progress[0] if isinstance(p.progress, tuple) else 0
            tokens += max(0, done - self._progress.get(p.uid, 0))
            self._progress[p.uid] = done
            if p.end_of_prompt:
                self._progress.pop(p.uid, None)
        if tokens >= PREFILL_MIN and seconds > 0:
            rate = tokens / seconds
            self._rate = rate if self._rate is None else 0.5 * (self._rate + rate)
            chunk = int(self._rate * STEP_SECONDS)
            self._prefill_chunk = max(PREFILL_MIN, min(PREFILL_MAX, chunk))

    def digest(self) -> int:
        """The step's decisions, which every rank of a sharded model must share.

        Which requests wait and run, from how many cached prompt tokens, how
        many tokens each has decided, and what the prefix cache holds.
        """
        import hashlib

        running = sorted(
            (live.number, live.cached, live.generated, live.decoding)
            for live in self._live.values()
        )
        state = (
            running,
            sorted(w.number for w in self._waiting),
            self._prefix.digest(),
        )
        return int.from_bytes(hashlib.sha256(repr(state).encode()).digest()[:8], "big")

    def prefix_count_tokens(self, token_bytes: int) -> None:
        """Bound the prefix cache in tokens (a sharded model: see `PrefixCache`)."""
        self._prefix.count_tokens(token_bytes)

    def fail_all(self, error: BaseException) -> None:
        """Deliver `error` to every request and start from an empty batch."""
        for live in [*self._live.values(), *self._waiting]:
            self._end(live, "error", error=copy_error(error))
        self._live.clear()
        self._waiting.clear()
        self._jobs.clear()
        self._providers.clear()
        self._progress.clear()
        self._solo = None
        self.release()

    def release(self) -> None:
        """Drop the batch generator and everything it holds."""
        if self._generator is not None:
            try:
                self._generator.close()
            finally:
                self._generator = None

    # -- admission ------------------------------------------------------------

    def _ensure_generator(self) -> Any:
        if self._generator is None:
            if self.batched:
                from mlx_lm.generate import BatchGenerator

                self._generator = BatchGenerator(
                    self._model,
                    completion_batch_size=self._max_batch_size,
                    prefill_batch_size=self._max_batch_size,
                    prefill_step_size=self._prefill_chunk,
                )
            else:
                from langchain_mlx.engine.serial import SerialGenerator

                self._generator = SerialGenerator(
                    self._model, prefill_step_size=self._prefill_chunk
                )
        return self._generator

    def _footprint(self, requests: list[Request]) -> int:
        """KV bytes a batch of `requests` may come to hold.

        A batch's caches are as long as its longest sequence (prompt +
        max_tokens; shorter ones are padded) and grow in steps of 256 tokens.
        """
        if not requests:
            return 0
        longest = max(len(r.prompt_ids) + r.settings.max_tokens for r in requests)
        return len(requests) * (longest + KV_STEP) * self._token_bytes

    def _room_for(self, live: Live) -> bool:
        """Whether `live` fits the KV budget now; the prefix cache gives way first.

        Entries the prefix cache drops are on disk already when it has a disk
        tier (every state it keeps is written there).
        """
        if self.kv_budget is None:
            return True
        running = [other.request for other in self._live.values()]
        need = self._footprint([*running, live.request])
        if need > self.kv_budget and self._live:
            return False  # wait for a running request to finish
        self._prefix.shrink_to(max(self.kv_budget - need, 0))
        return True

    def _admit(self) -> None:
        if self._solo is not None and self._waiting:
            self._solo_to_batch(self._solo)  # company: one token per step for all
        if (
            self._solo is None
            and len(self._waiting) == 1
            and not self._live
            and not self._jobs
            and self._solo_pays(self._waiting[0].request)
            and self._room_for(self._waiting[0])
        ):
            live = self._waiting.popleft()
            try:
                self._start_solo(live)
            except Exception as e:  # a bad request fails alone
                logger.debug("could not start a request", exc_info=True)
                self._end(live, "error", error=e)
            return
        limit = self._max_batch_size if self.batched else 1
        free = limit - len(self._live) - len(self._jobs)
        if self._share_prefixes and self._prefix.enabled:
            free = self._share_prefixes_of_newcomers(free)
        for live in list(self._waiting):
            if free <= 0:
                break
            if live.waits_for in self._providers:  # its start is on the way
                continue
            if not self._room_for(live):
                break  # in order: later requests wait behind it
            self._waiting.remove(live)
            try:
                self._insert(live)
                free -= 1
            except Exception as e:  # a bad request fails alone
                logger.debug("could not start a request", exc_info=True)
                self._end(live, "error", error=e)

    def _share_prefixes_of_newcomers(self, free: int) -> int:
        """Make newcomers wait for a prefill that covers their uncached start."""
        newcomers = [w for w in self._waiting if not w.checked]
        if not newcomers:
            return free
        in_flight = {
            uid: list(live.request.prompt_ids)
            for uid, live in self._live.items()
            if not live.decoding
        }
        in_flight.update(self._providers)
        alone: list[tuple[Live, list[int], int]] = []
        for w in newcomers:
            w.checked = True
            prompt = list(w.request.prompt_ids)
            cached = self._prefix.reusable(prompt)
            shared, uid = max(
                (
                    (common_length(prompt, t, len(prompt) - 1), u)
                    for u, t in in_flight.items()
                ),
                default=(0, -1),
            )
            if shared - cached >= SHARED_PREFIX_MIN:
                w.waits_for = uid
                self._providers.setdefault(uid, in_flight[uid])
            else:
                alone.append((w, prompt, cached))
        prompts = [prompt for _, prompt, _ in alone]
        for length, members in shared_prefixes(prompts, SHARED_PREFIX_MIN):
            if free <= 0:
                break
            prefix = prompts[members[0]][:length]
            if length - self._prefix.reusable([*prefix, 0]) < SHARED_PREFIX_MIN:
                continue  # mostly cached already
            uid, _ = self._insert_tokens(prefix, max_tokens=1, processors=[])
            self._jobs.add(uid)
            self._providers[uid] = prefix
            for i in members:
                alone[i][0].waits_for = uid
            free -= 1
        return free

    def _provide(self, uid: int) -> None:
        """A prompt others wait for is prefilled: keep a copy of its KV state."""
        del self._providers[uid]  # its waiters are admitted next step either way
        try:
            for cache, tokens in self._ensure_generator().extract_cache([uid]).values():
                self._prefix.store(tokens, cache, kind="user")
        except Exception:  # costs reuse only
            logger.warning("could not keep a shared prompt start", exc_info=True)

    def _insert_tokens(
        self,
        prompt: list[int],
        *,
        max_tokens: int,
        processors: list[LogitsProcessor],
        sampler: Sampler | None = None,
        checkpoints: Sequence[int] = (),
    ) -> tuple[int, int]:
        """Put a sequence in the batch from its longest cached prefix.

        Returns its uid and how many prompt tokens came from the cache.
        """
        generator = self._ensure_generator()
        cache, cached = self._prefix.fetch(prompt)
        cuts = [c for c in sorted(set(checkpoints)) if cached < c < len(prompt) - 1]
        if not hasattr(generator, "insert_segments"):
            cuts = []  # one sequence at a time: no segments
        bounds = [cached, *cuts, len(prompt)]
        segments = [prompt[a:b] for a, b in itertools.pairwise(bounds)]
        insert = generator.insert_segments if cuts else generator.insert
        (uid,) = insert(
            [segments] if cuts else [prompt[cached:]],
            max_tokens=[max_tokens],
            caches=[cache],
            all_tokens=[prompt[:cached]],
            samplers=[sampler],
            logits_processors=[processors],
            stop_sequences=[self._eos_stops],
        )
        return uid, cached

    def _insert(self, live: Live) -> None:
        request = live.request
        settings = request.settings
        processors = [guarded(p, live) for p in request_processors(settings, request)]
        uid, cached = self._insert_tokens(
            list(request.prompt_ids),
            max_tokens=settings.max_tokens,
            processors=processors,
            sampler=guarded_sampler(make_request_sampler(settings), live),
            checkpoints=request.checkpoints,
        )
        self._track(live, uid, cached)

    def _track(self, live: Live, uid: int, cached: int) -> None:
        """A request is in: its text pipeline, counters and place in `_live`."""
        request = live.request
        settings = request.settings
        live.uid = uid
        live.cached = cached
        live.cache_source = self._prefix.last_source  # of the fetch just made
        live.admitted = time.perf_counter()
        live.text = RequestText(
            request.text,
            settings.stop,
            self._tokenizer.detokenizer,  # a fresh copy per call
            with_logprobs=settings.logprobs,
        )
        self._live[uid] = live
        self.largest_batch = max(self.largest_batch, len(self._live))

    def gone(self) -> dict[int, str]:
        """Requests whose reader left ("cancelled") or whose time is up ("timeout")."""
        now = time.perf_counter()
        out: dict[int, str] = {}
        for live in [*self._waiting, *self._live.values()]:
            deadline = live.deadline
            if live.handle.cancelled:
                out[live.number] = "cancelled"
            elif deadline is not None and now > deadline:
                out[live.number] = "timeout"
        return out

    def _sweep(self, gone: dict[int, str]) -> None:
        """Drop the requests `gone` names."""
        if not gone:
            return
        now = time.perf_counter()
        for live in [w for w in self._waiting if w.number in gone]:
            self._waiting.remove(live)
            if gone[live.number] == "cancelled":
                self._end(live, "cancelled")
            else:
                self._end(live, "error", error=timeout_error(live, now))
        self._remove([live for live in self._live.values() if live.number in gone])

    # -- a lone request: speculative.Solo, until company arrives ---------------

    def _solo_pays(self, request: Request) -> bool:
        """Whether decoding `request` alone can skip work (forced or drafted tokens)."""
        s = request.settings
        drafts = (
            s.num_draft_tokens > 0
            and (s.prompt_lookup or self.draft_model is not None)
            # a rejected draft must be taken back off the cache: not past a
            # sliding window, not at all from caches that cannot be cut
            and (self._undo_limit is None
                 or self._undo_limit - len(request.prompt_ids) > 1)
        )  # fmt: skip
        forced = s.fast_forward and request.constraint is not None
        return drafts or forced

    def _start_solo(self, live: Live) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        request = live.request
        settings = request.settings
        prompt = list(request.prompt_ids)
        cache, cached = self._prefix.fetch(prompt)
        uid = self._solo_uids
        self._solo_uids -= 1
        solo = Solo(
            self._model,
            uid=uid,
            prompt=prompt,
            cache=cache if cache is not None else make_prompt_cache(self._model),
            cached=cached,
            max_tokens=settings.max_tokens,
            sampler=guarded_sampler(make_request_sampler(settings), live),
            processors=[
                guarded(p, live) for p in request_processors(settings, request)
            ],
            stop_sequences=self._eos_stops,
            constraint=request.constraint,
            checkpoints=request.checkpoints,
            fast_forward=settings.fast_forward,
            lookup=settings.prompt_lookup,
            num_draft_tokens=settings.num_draft_tokens,
            draft_model=self._drafter(),
            costs=self._costs,
            logprobs=settings.logprobs,
            pipelined=settings.temperature == 0 or settings.seed is None,
            head=self._output_head,
        )
        live.stats = solo.stats
        self._track(live, uid, cached)
        self._solo = solo

    def _drafter(self) -> DraftModel | None:
        """The engine's draft model with its KV cache (kept between requests)."""
        if self.draft_model is None:
            return None
        if self._draft is None or self._draft.model is not self.draft_model:
            ours, its = weight_bytes(self._model), weight_bytes(self.draft_model)
            size = its / ours if ours and its else 1.0
            self._draft = DraftModel(self.draft_model, self._costs, size=size)
        return self._draft

    def _output_head(self) -> Any:
        """The model's output layer when passes can skip it (probed at first use)."""
        if not self._head_probed:
            self._head_probed = True
            self._head = output_head(self._model)
        return self._head

    def _step_solo(self, solo: Solo) -> None:
        live = self._live[solo.uid]
        tic = time.perf_counter()
        try:
            prompt_responses, responses = solo.next(self.solo_prefill_chunk)
        except Exception as e:  # e.g. a model failure: this request only
            logger.debug("a solo step failed", exc_info=True)
            self._solo = None
            del self._live[solo.uid]
            self._end(live, "error", error=request_error("decoding", e))
            return
        self._measure_prefill(prompt_responses, time.perf_counter() - tic)
        if any(p.end_of_prompt for p in prompt_responses):
            live.decoding = True
        if any(p.end_of_segment and not p.end_of_prompt for p in prompt_responses):
            self._store(list(solo.tokens), solo.cache, kind="user")  # a checkpoint
        to_remove: list[Live] = []
        for r in responses:
            if solo.uid not in self._live or to_remove:
                break  # finished (e.g. a stop string) within this step
            self._on_token(live, r, to_remove)
        if solo.uid not in self._live:
            self._solo = None
        self._remove(to_remove)

    def _solo_to_batch(self, solo: Solo) -> None:
        """Move the lone request into the batch: its cache and what is not in it."""
        self._solo = None
        solo.hand_off()
        live = self._live.pop(solo.uid)
        (uid,) = self._ensure_generator().insert(
            [solo.rest],
            max_tokens=[solo.remaining],
            caches=[solo.cache],
            all_tokens=[solo.tokens],
            samplers=[solo.sampler],
            logits_processors=[solo.processors],
            stop_sequences=[self._eos_stops],
        )
        live.uid = uid
        self._live[uid] = live

    # -- delivery -------------------------------------------------------------

    def _on_token(self, live: Live, r: Any, to_remove: list[Live]) -> None:
        if live.error is not None:  # its sampler or a logits processor failed
            to_remove.append(live)
            return
        live.generated += 1
        if live.first is None:
            live.first = time.perf_counter()
        assert live.text is not None
        finish = r.finish_reason
        eos = finish == "stop" and r.token in self._eos_ids
        if not eos:
            live.last_token = r.token
            try:
                entry = (
                    token_logprob(
                        self._tokenizer,
                        r.logprobs,
                        r.token,
                        live.request.settings.top_logprobs,
                    )
                    if live.request.settings.logprobs
                    else None
                )
                for segment in live.text.add(r.token, entry):
                    live.handle._put(segment)
            except Exception as e:  # e.g. the detokenizer: this request only
                live.error = request_error("decoding its text", e)
                finish = "error"
            if live.text.stopped:
                finish = "stop"
        if finish is None:
            return
        if r.finish_reason is None or live.error is not None:
            to_remove.append(live)  # still in the batch: take it out
            return
        self._store(r.all_tokens, r.prompt_cache)
        del self._live[live.uid]
        self._end(live, finish_reason(live, finish))

    def _keep_checkpoint(self, uid: int) -> None:
        """A prompt reached one of its checkpoints: keep a copy of its KV state."""
        try:
            for cache, tokens in self._ensure_generator().extract_cache([uid]).values():
                if len(tokens) in self._live[uid].request.checkpoints:
                    self._store(list(tokens), cache, kind="user")
        except Exception:  # costs reuse only
            logger.warning("could not keep a checkpoint", exc_info=True)

    def _store(self, tokens: Any, cache: Any, *, kind: str = "assistant") -> None:
        """Keep a sequence's KV state; a failure here costs reuse only."""
        if tokens is None or cache is None:
            return
        try:
            self._prefix.store(tokens, cache, kind=kind)
        except Exception:
            logger.warning("could not keep a KV cache for reuse", exc_info=True)

    def _remove(self, lives: list[Live]) -> None:
        """Take live requests out of the batch and finish them."""
        if not lives:
            return
        solo = self._solo
        uids = [live.uid for live in lives if solo is None or live.uid != solo.uid]
        try:
            caches = (
                self._ensure_generator().remove(uids, return_prompt_caches=True)
                if uids
                else {}
            )
            if solo is not None and len(uids) < len(lives):
                solo.settle()
                caches[solo.uid] = (solo.cache, solo.tokens)
                self._solo = None
        except Exception as e:  # they would decode on, unseen: start afresh
            logger.warning("could not take requests out of the batch", exc_info=True)
            self.fail_all(request_error("taking requests out of the batch", e))
            return
        now = time.perf_counter()
        for live in lives:
            self._live.pop(live.uid, None)
            self._providers.pop(live.uid, None)
            if live.error is None:
                cache, tokens = caches.get(live.uid, (None, None))
                self._store(tokens, cache)
            if live.error is not None:
                self._end(live, "error", error=live.error)
            elif live.text is not None and live.text.stopped:
                self._end(live, "stop")
            elif live.handle.cancelled:
                self._end(live, "cancelled")
            else:
                self._end(live, "error", error=timeout_error(live, now))

    def _end(
        self, live: Live, reason: str, *, error: BaseException | None = None
    ) -> None:
        """Send the request's last events and count it (never raises)."""
        try:
            if error is None and reason != "cancelled" and live.text is not None:
                for segment in live.text.finish():
                    live.handle._put(segment)
            if error is None:
                live.handle._put(final_event(live, reason))
        except Exception as e:
            error = request_error("finishing it", e)
        if error is not None:
            live.handle._put(error)
        self._on_done("error" if error is not None else reason)
