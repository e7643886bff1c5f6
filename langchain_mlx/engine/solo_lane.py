"""The scheduler's lane for a request that has the engine to itself.

`SoloLane` is the part of `Scheduler` (scheduler.py) that decodes a lone
request with `speculative.Solo` (grammar fast-forward, prompt-lookup and
draft-model speculation) and moves it into the batch when company arrives.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from langchain_mlx.engine.drafts import DraftModel, StepCosts
from langchain_mlx.engine.guards import guarded, guarded_sampler, request_error
from langchain_mlx.engine.live import Live
from langchain_mlx.engine.model_facts import output_head
from langchain_mlx.engine.prefix_cache import PrefixCache
from langchain_mlx.engine.sampling import make_request_sampler, request_processors
from langchain_mlx.engine.speculative import Solo
from langchain_mlx.engine.types import Request

logger = logging.getLogger(__name__)


class SoloLane:
    """Mixin of `Scheduler`: a lone request's decoding (uses the scheduler's state)."""

    # the scheduler's state this part reads and sets (defined by Scheduler)
    _model: Any
    _prefix: PrefixCache
    _eos_stops: Any
    _live: dict[int, Live]
    _solo: Solo | None
    _solo_uids: int
    _costs: StepCosts
    _head: Any
    _head_probed: bool
    _undo_limit: int | None
    _draft: DraftModel | None
    draft_model: Any

    @property
    def solo_prefill_chunk(self) -> int:
        """Prompt tokens per prefill step of a lone request (Scheduler)."""
        raise NotImplementedError

    def _ensure_generator(self) -> Any:
        raise NotImplementedError

    def _track(self, live: Live, uid: int, cached: int) -> None:
        raise NotImplementedError

    def _end(
        self, live: Live, reason: str, *, error: BaseException | None = None
    ) -> None:
        raise NotImplementedError

    def _measure_prefill(self, prompt_responses: list[Any], seconds: float) -> None:
        raise NotImplementedError

    def _on_token(self, live: Live, r: Any, to_remove: list[Live]) -> None:
        raise NotImplementedError

    def _store(self, tokens: Any, cache: Any, *, kind: str = "assistant") -> None:
        raise NotImplementedError

    def _remove(self, lives: list[Live]) -> None:
        raise NotImplementedError

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
            self._draft = DraftModel(self.draft_model)
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
