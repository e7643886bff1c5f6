"""Where two engine features meet: the invariants of the lone -> batch handoff.

The scheduler is driven step by step on the test's own thread (no worker, no
clock), so "another request arrives after step k" is exact:

- the grammar has consumed exactly the decided tokens when a lone request
  moves into the batch (a planned step with forced tokens and a draft is
  dropped there);
- a seeded key is split once per decided token, whichever path decides it
  (forced tokens, drafts, the batch), so seeded sampled output is the same
  alone, batched and without the fast paths;
- the KV cache holds exactly the decided tokens, also for rotating (sliding
  window) caches that cannot be cut back once they are full.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from langchain_mlx._constraints import ConstraintCompiler, json_schema_grammar
from langchain_mlx.engine.handle import RequestHandle
from langchain_mlx.engine.prefix_cache import PrefixCache
from langchain_mlx.engine.scheduler import Scheduler
from langchain_mlx.engine.types import (
    Final,
    GenerationSettings,
    Request,
    Segment,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "city": {"type": "string", "maxLength": 12},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
# The prompt shows the answer's shape, so prompt lookup drafts inside it.
PROMPT = 'Answer in JSON like {"name": "Ann", "age": 3, "city": "Rome"}: someone.'


@pytest.fixture(scope="module")
def loaded(tiny_model_path: str) -> tuple[Any, Any]:
    from mlx_lm import load

    return load(tiny_model_path)  # type: ignore[return-value]


def make_scheduler(loaded: tuple[Any, Any]) -> Scheduler:
    model, tokenizer = loaded
    return Scheduler(
        model,
        tokenizer,
        eos_ids=sorted(tokenizer.eos_token_ids),
        prefix_cache=PrefixCache(0, 0),  # nothing reused: each run from scratch
        on_done=lambda reason: None,
        max_batch_size=4,
        measured_costs=False,  # the fixed cost model: no clock decides a draft
    )


def structured(loaded: tuple[Any, Any], **settings: Any) -> Request:
    _, tokenizer = loaded
    compiler = ConstraintCompiler.for_tokenizer(tokenizer)
    grammar = compiler.processor(json_schema_grammar(SCHEMA), "the schema")
    return Request(
        prompt_ids=tokenizer.encode(PROMPT),
        settings=GenerationSettings(**{"max_tokens": 60, **settings}),
        constraint=grammar,
    )


def plain(loaded: tuple[Any, Any], text: str = "Hello there.") -> Request:
    _, tokenizer = loaded
    settings = GenerationSettings(max_tokens=12, prompt_lookup=False)
    return Request(prompt_ids=tokenizer.encode(text), settings=settings)


def events(handle: RequestHandle) -> Iterator[Segment | Final | BaseException]:
    while not handle._sync_q.empty():
        yield handle._sync_q.get()


def run(
    scheduler: Scheduler,
    first: Request,
    *,
    join_after: int | None = None,
    joiner: Request | None = None,
) -> tuple[str, Final]:
    """Decode `first`; after `join_after` steps another request arrives."""
    handle = RequestHandle(lambda: None)
    scheduler.add(handle, first, 0.0, 0)
    text, final, steps = "", None, 0
    while final is None:
        if steps == join_after:
            assert joiner is not None
            scheduler.add(RequestHandle(lambda: None), joiner, 0.0, 1)
        scheduler.step()
        steps += 1
        for event in events(handle):
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, Segment):
                text += event.text
            else:
                final = event
        assert steps < 500, "the request never finished"
    while scheduler.busy:  # let the other request finish too
        scheduler.step()
    return text, final


def test_a_lone_structured_request_joined_at_any_step_stays_valid(
    loaded: tuple[Any, Any],
) -> None:
    scheduler = make_scheduler(loaded)
    alone, final = run(scheduler, structured(loaded))
    assert final.forced_tokens > 0 and final.drafted_tokens > 0  # both ran
    assert set(json.loads(alone)) == {"name", "age", "city"}
    for k in range(1, 9):
        text, _ = run(
            make_scheduler(loaded),
            structured(loaded),
            join_after=k,
            joiner=plain(loaded),
        )
        assert set(json.loads(text)) == {"name", "age", "city"}, (k, text)
        assert text == alone, k  # greedy: the same answer however scheduled


def test_the_handoff_leaves_the_grammar_at_the_decided_tokens(
    loaded: tuple[Any, Any],
) -> None:
    # Step until a planned step holds forced tokens and a draft, then let
    # company arrive: the plan is dropped, the grammar must not stay ahead.
    scheduler = make_scheduler(loaded)
    request = structured(loaded)
    scheduler.add(RequestHandle(lambda: None), request, 0.0, 0)
    planned = None
    for _ in range(200):
        scheduler.step()
        solo = scheduler._solo
        plan = getattr(solo, "_plan", None)
        if plan is not None and plan[0]:  # validating a draft consumed them
            planned = solo
            break
    assert planned is not None, "no step planned forced tokens"
    scheduler.add(RequestHandle(lambda: None), plain(loaded), 0.0, 1)
    scheduler.step()
    assert scheduler._solo is None
    grammar = request.constraint
    assert grammar is not None
    decided = len(planned.history) - planned.total
    assert grammar.consumed == decided  # type: ignore[attr-defined]


@pytest.mark.parametrize("fast", [True, False])
def test_seeded_sampled_structured_output_is_the_same_however_scheduled(
    loaded: tuple[Any, Any], fast: bool
) -> None:
    seeded: dict[str, Any] = {"temperature": 0.9, "seed": 11}
    if not fast:
        seeded.update(fast_forward=False, prompt_lookup=False)
    alone, final = run(make_scheduler(loaded), structured(loaded, **seeded))
    if fast:
        assert final.forced_tokens > 0
    reference, _ = run(
        make_scheduler(loaded),
        structured(loaded, temperature=0.9, seed=11, fast_forward=False),
        join_after=0,  # batched from the first step: sampled at every position
        joiner=plain(loaded),
    )
    assert alone == reference
    json.loads(alone)


WINDOW = 48


class SlidingWindow:
    """The tiny llama with sliding-window caches (as Gemma 3's local layers)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.model, self.args, self.layers = inner.model, inner.args, inner.layers

    def __call__(self, x: Any, cache: Any = None) -> Any:
        return self._inner(x, cache=cache)

    def make_cache(self) -> list[Any]:
        from mlx_lm.models.cache import RotatingKVCache

        return [RotatingKVCache(max_size=WINDOW) for _ in self.layers]


class Contrary:
    """A draft model that proposes the token the model likes least."""

    def __init__(self, inner: Any) -> None:
        self._inner, self.layers = inner, inner.layers

    def __call__(self, x: Any, cache: Any = None) -> Any:
        return -self._inner(x, cache=cache)


def drafting_with(scheduler: Scheduler, draft_model: Any) -> None:
    """Draft with `draft_model` under fixed costs where its drafts pay (a GPU's:
    a pass costs the same whatever it feeds, and the draft model little)."""
    from langchain_mlx.engine.drafts import DraftModel, StepCosts

    scheduler._costs = StepCosts(measured=False, extra=0.0)
    scheduler.draft_model = draft_model
    scheduler._draft = DraftModel(draft_model, scheduler._costs, size=0.05)


def test_a_draft_never_crosses_a_sliding_window_it_cannot_take_back(
    loaded: tuple[Any, Any],
) -> None:
    # Every draft is rejected and must be cut back off the cache. The prompt
    # ends just below the window, so the first verify pass of a full draft
    # would cross it; past it, a rotating cache cannot be cut back.
    from langchain_mlx.engine.model_facts import cache_length

    model, tokenizer = loaded
    windowed = SlidingWindow(model)
    prompt = tokenizer.encode("one two three four five six seven " * 12)
    prompt = prompt[: WINDOW - 3]

    def decode(draft: bool) -> tuple[list[int], Final]:
        scheduler = make_scheduler((windowed, tokenizer))
        if draft:
            drafting_with(scheduler, Contrary(model))
        handle = RequestHandle(lambda: None)
        settings = GenerationSettings(
            max_tokens=30, prompt_lookup=False, num_draft_tokens=6 if draft else 0
        )
        scheduler.add(handle, Request(prompt_ids=prompt, settings=settings), 0.0, 0)
        tokens: list[int] = []
        while scheduler.busy:
            solo = scheduler._solo
            scheduler.step()
            if solo is not None and scheduler._solo is solo:
                # the KV cache holds exactly the tokens decided and fed
                assert cache_length(solo.cache) == solo.fed
                tokens = solo.history[len(prompt) :]
        (*_, final) = events(handle)
        assert isinstance(final, Final), final
        return tokens, final

    plain, _ = decode(draft=False)
    drafted, final = decode(draft=True)
    assert final.drafted_tokens > 0 and final.accepted_tokens == 0
    assert drafted[: len(plain)] == plain


# -- the prefix cache: recency, saved prefixes, the budget before the copy --------


def prefilled(loaded: tuple[Any, Any], tokens: list[int]) -> list[Any]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = loaded
    cache = make_prompt_cache(model)
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def seq(start: int, n: int = 20) -> list[int]:
    return list(range(start, start + n))


def test_a_hit_makes_an_entry_the_most_recently_used(loaded: tuple[Any, Any]) -> None:
    cache = PrefixCache(entries=2)
    a, b, c = seq(100), seq(300), seq(500)
    cache.store(a, prefilled(loaded, a))
    cache.store(b, prefilled(loaded, b))
    assert cache.fetch([*a, 7])[1] == len(a)  # a is used again...
    cache.store(c, prefilled(loaded, c))  # ...so b, not a, makes room
    assert cache.reusable([*a, 7]) == len(a)
    assert cache.reusable([*b, 7]) == 0


def test_a_saved_prefix_keeps_its_priority_once_used(
    loaded: tuple[Any, Any], tmp_path: Any
) -> None:
    model, _ = loaded
    cache = PrefixCache(entries=3)
    system = seq(100)
    cache.save(tmp_path / "system.safetensors", model, system, name="tiny")
    turn = [*system, *seq(900, 10)]  # a request that starts with it finished
    cache.store(turn, prefilled(loaded, turn))
    for start in (300, 500, 700):  # three more conversations fill the cache
        cache.store(seq(start), prefilled(loaded, seq(start)))
    assert cache.reusable([*system, 1]) == len(system)


def test_an_entry_over_the_budget_is_not_copied(loaded: tuple[Any, Any]) -> None:
    import gc

    import mlx.core as mx

    tokens = seq(100, 200)
    kv = prefilled(loaded, tokens)
    from langchain_mlx.engine.prefix_cache import used_bytes

    cache = PrefixCache(entries=4, nbytes=used_bytes(kv) - 1)
    gc.collect()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    cache.store(tokens, kv)
    assert cache.entries == 0
    assert mx.get_peak_memory() - before < used_bytes(kv) // 2


def test_the_draft_model_keeps_its_cache_between_requests(
    loaded: tuple[Any, Any],
) -> None:
    # An agent's next step resends the conversation: the draft model reads
    # only what is new, and a long new stretch one chunk per step.
    from langchain_mlx.engine.drafts import DraftModel

    model, tokenizer = loaded
    scheduler = make_scheduler(loaded)
    drafting_with(scheduler, model)
    settings = GenerationSettings(max_tokens=8, prompt_lookup=False)
    history = tokenizer.encode("The story so far. " * 100)  # > CATCH_UP tokens
    assert len(history) > DraftModel.CATCH_UP
    for step in range(2):
        request = Request(prompt_ids=history, settings=settings)
        scheduler.add(RequestHandle(lambda: None), request, 0.0, step)
        read = []
        while scheduler.busy:
            scheduler.step()
            drafter = scheduler._draft
            if drafter is not None:
                read.append(drafter.caught_up)
        assert 0 < max(read) <= DraftModel.CATCH_UP
        if step == 1:  # the earlier conversation was not read again
            assert sum(read) < len(history) // 2, read
        history = [*history, *tokenizer.encode(" And then more happened.")]


# -- the engine's lifetime: what arrives after it stopped; close in async code ----


def test_a_request_queued_as_the_worker_stops_ends_once_and_is_counted(
    tiny_model_path: str,
) -> None:
    from langchain_mlx.engine.engine import Engine
    from langchain_mlx.engine.intake import Submission
    from langchain_mlx.engine.types import EngineStoppedError

    model, tokenizer = load_tiny(tiny_model_path)
    engine = Engine.for_objects(model, tokenizer, name="tiny-stops")
    engine.close()
    assert engine._worker.parked.is_set()
    handle = RequestHandle(lambda: None)
    late = Submission(handle, plain((model, tokenizer)), 0.0, number=10_000)
    engine.intake._in_flight += 1  # as `admit` counted it, just before the stop
    engine.intake.enqueue([late], engine.stopped_error)  # sees the worker parked
    engine._end_queued()  # and the worker's own drain finds it queued too
    events_seen = list(events(handle))
    assert len(events_seen) == 1 and isinstance(events_seen[0], EngineStoppedError)
    assert engine.finished["error"] == 1
    assert engine.intake._in_flight == 0


def test_close_in_async_code_does_not_block_the_event_loop(
    tiny_model_path: str,
) -> None:
    import asyncio
    import threading

    from langchain_mlx.engine.engine import Engine

    model, tokenizer = load_tiny(tiny_model_path)
    engine = Engine.for_objects(model, tokenizer, name="tiny-async-close")
    release = threading.Event()
    engine._worker.submit(lambda: release.wait(60))  # the worker is busy...

    async def main() -> None:
        # ...until the event loop gets to run this: a close() that waited for
        # the worker on the loop's thread would wait for itself
        asyncio.get_running_loop().call_soon(release.set)
        engine.close()
        await engine.aclose(wait=None)  # waits without blocking the loop
        assert engine._worker.parked.is_set()

    done = threading.Event()
    runner = threading.Thread(target=lambda: (asyncio.run(main()), done.set()))
    runner.start()
    runner.join(timeout=300)  # a guard against a hang, not a measurement
    release.set()
    assert done.is_set()


def load_tiny(path: str) -> tuple[Any, Any]:
    from mlx_lm import load

    return load(path)  # type: ignore[return-value]


def test_the_batch_and_the_serial_generator_speak_one_protocol(
    loaded: tuple[Any, Any],
) -> None:
    from mlx_lm.generate import BatchGenerator

    from langchain_mlx.engine.serial import SerialGenerator
    from langchain_mlx.engine.types import SequenceGenerator

    model, _ = loaded
    for generator in (BatchGenerator(model), SerialGenerator(model)):
        assert isinstance(generator, SequenceGenerator)
        generator.close()


# -- memory inside a bound ----------------------------------------------------------


def test_concurrent_long_requests_stay_inside_the_kv_budget(
    tmp_path: Any,
) -> None:
    import gc

    import mlx.core as mx
    from mlx_lm import load

    from tests.tiny_models import write_tiny_model

    folder = write_tiny_model(tmp_path / "wide", hidden_size=256, num_layers=4,
                              dtype="float32")  # fmt: skip
    model, tokenizer = load(str(folder))
    scheduler = make_scheduler((model, tokenizer))
    per_request = (300 + 100 + 256) * scheduler._token_bytes
    scheduler.kv_budget = 2 * per_request  # two of the six at a time
    gc.collect()
    mx.clear_cache()
    baseline = mx.get_active_memory()
    handles = []
    for i in range(6):
        prompt = [(17 * i + 7 * j) % 4000 + 100 for j in range(300)]
        settings = GenerationSettings(max_tokens=100, prompt_lookup=False)
        handle = RequestHandle(lambda: None)
        scheduler.add(handle, Request(prompt_ids=prompt, settings=settings), 0.0, i)
        handles.append(handle)
    held, most = 0, 0
    while scheduler.busy:
        scheduler.step()
        most = max(most, len(scheduler._live))
        held = max(held, mx.get_active_memory() - baseline)
    assert most == 2
    # beyond the budget, a step holds per sequence its logits rows (this step's
    # and the launched next one's) and, while a cache grows, one more block of
    # 256 positions; six requests at once would hold three times the budget
    from langchain_mlx.engine.scheduler import KV_STEP

    step = most * (4 * tokenizer.vocab_size * 4 + KV_STEP * scheduler._token_bytes)
    assert held <= scheduler.kv_budget + step, (held, scheduler.kv_budget, step)
    for handle in handles:  # every request ran to its end
        (*_, final) = events(handle)
        assert isinstance(final, Final) and final.generation_tokens == 100


def test_a_request_that_can_never_fit_the_budget_is_refused(
    tiny_model_path: str,
) -> None:
    from langchain_mlx.engine.engine import Engine
    from langchain_mlx.engine.types import EngineOverloadedError

    model, tokenizer = load_tiny(tiny_model_path)
    engine = Engine.for_objects(
        model, tokenizer, name="tiny-budget", options={"kv_memory_bytes": 100_000}
    )
    try:
        request = plain((model, tokenizer))
        too_long = Request(
            prompt_ids=request.prompt_ids,
            settings=GenerationSettings(max_tokens=1000),
        )
        with pytest.raises(EngineOverloadedError, match=r"kv_memory_bytes"):
            engine.submit(too_long)
        assert engine.kv_budget() == 100_000
    finally:
        engine.close()
