"""Continuous batching, cancellation and limits, on the tiny random-weight model.

Concurrent requests (threads, asyncio tasks, ChatMLX streams) share one decode
loop; each must get exactly the output it gets alone. Prompts differ per request
so that crossed outputs would show.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from langchain_mlx import ChatMLX
from langchain_mlx._settings import GenerationSettings
from langchain_mlx.engine.engine import Engine
from langchain_mlx.engine.types import (
    EngineOptions,
    EngineOverloadedError,
    Final,
    GenerationTimeoutError,
    Request,
    Segment,
)


def settings(i: int, **overrides: Any) -> GenerationSettings:
    """Seeded sampling with a per-request seed (random weights: varied tokens)."""
    base: dict[str, Any] = {"temperature": 1.0, "seed": 100 + i, "max_tokens": 16}
    return GenerationSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def make_engine(tiny_model_path: str) -> Iterator[Callable[..., Engine]]:
    """Fresh engines on one loaded tiny model; all closed after the module."""
    from mlx_lm import load

    model, tokenizer = load(tiny_model_path)
    made: list[Engine] = []

    def make(
        name: str = "tiny-batching", batched: bool | None = None, **options: Any
    ) -> Engine:
        engine = Engine(
            model,
            tokenizer,
            name=name,
            options=EngineOptions(**options),
            batched=batched,
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine()


@pytest.fixture
def prompts(engine: Engine) -> list[list[int]]:
    tokenizer = engine.tokenizer
    return [
        list(tokenizer.encode(f"Request {i}: tell me about topic {i * 7}."))
        for i in range(8)
    ]


def text_of(events: list[Segment | Final]) -> str:
    assert isinstance(events[-1], Final)
    return "".join(e.text for e in events if isinstance(e, Segment))


def solo(engine: Engine, request: Request) -> str:
    return text_of(list(engine.submit(request)))


async def asolo(engine: Engine, request: Request) -> str:
    handle = engine.submit(request, loop=asyncio.get_running_loop())
    return text_of([e async for e in handle])


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30  # a hang guard, not a speed check
    while not condition():
        assert time.monotonic() < deadline, "the engine did not get there"
        time.sleep(0.01)


async def test_threads_and_tasks_get_their_solo_outputs(
    engine: Engine, prompts: list[list[int]]
) -> None:
    requests = [
        Request(p, settings(i) if i % 2 else settings(i, temperature=0.0))
        for i, p in enumerate(prompts)
    ]
    alone = [solo(engine, r) for r in requests]
    engine.clear_prefix_cache()  # the batch starts cold, mixing cached and not
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(4) as pool:
        threads = [loop.run_in_executor(pool, solo, engine, r) for r in requests[:4]]
        tasks = [asolo(engine, r) for r in requests[4:]]
        together = await asyncio.gather(*threads, *tasks)
    assert together == alone
    assert engine.largest_batch > 1


def test_a_newcomer_joins_a_running_batch(
    engine: Engine, prompts: list[list[int]]
) -> None:
    short = Request(prompts[1], settings(1, max_tokens=4))
    expected = solo(engine, short)
    long_run = iter(engine.submit(Request(prompts[0], settings(0, max_tokens=5000))))
    for _ in range(3):
        assert isinstance(next(long_run), Segment)
    assert solo(engine, short) == expected  # done while the long one runs
    assert isinstance(next(long_run), Segment)
    assert engine.largest_batch == 2
    cancelled = engine.finished["cancelled"]
    long_run.close()  # stop reading: the request leaves the batch
    wait_for(lambda: engine.finished["cancelled"] == cancelled + 1)


def test_an_abandoned_stream_leaves_while_others_continue(
    engine: Engine, prompts: list[list[int]]
) -> None:
    requests = [Request(p, settings(i, max_tokens=24)) for i, p in enumerate(prompts)]
    alone = [solo(engine, r) for r in requests[:3]]

    def abandon() -> str:
        handle = iter(engine.submit(Request(prompts[7], settings(7, max_tokens=5000))))
        seen = [next(handle) for _ in range(3)]
        handle.close()
        return text_of([*seen, Final("cancelled", 0, 0, 0, 0, 0, 0)])

    before = engine.finished["cancelled"]
    with ThreadPoolExecutor(4) as pool:
        quitter = pool.submit(abandon)
        others = list(pool.map(lambda r: solo(engine, r), requests[:3]))
    assert others == alone
    assert quitter.result()
    wait_for(lambda: engine.finished["cancelled"] == before + 1)


def test_stop_strings_and_max_tokens_stay_per_request(
    engine: Engine, prompts: list[list[int]]
) -> None:
    full = solo(engine, Request(prompts[0], settings(0, max_tokens=24)))
    stop = full[6:9]
    cut = Request(prompts[0], settings(0, max_tokens=24, stop=(stop,)))
    short = Request(prompts[1], settings(1, max_tokens=3))
    plain = Request(prompts[2], settings(2, max_tokens=24))
    alone = [solo(engine, r) for r in (cut, short, plain)]
    assert alone[0] == full[: full.find(stop)]
    with ThreadPoolExecutor(3) as pool:
        events = list(pool.map(lambda r: list(engine.submit(r)), (cut, short, plain)))
    assert [text_of(e) for e in events] == alone
    finals = [e[-1] for e in events]
    assert [f.finish_reason for f in finals] == ["stop", "length", "length"]  # type: ignore[union-attr]
    assert finals[1].generation_tokens == 3  # type: ignore[union-attr]


def test_logits_processors_stay_with_their_request(
    engine: Engine, prompts: list[list[int]]
) -> None:
    forced = 1000  # a token id the constrained request must always produce
    contexts: list[list[int]] = []

    def only_one_token(tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        contexts.append(tokens.tolist())
        allowed = mx.arange(logits.shape[-1]) == forced
        return mx.where(allowed, logits, -float("inf"))

    constrained = Request(prompts[0], settings(0), logits_processors=[only_one_token])
    free = [Request(p, settings(i)) for i, p in enumerate(prompts[1:4], start=1)]
    alone = [solo(engine, r) for r in free]
    contexts.clear()
    with ThreadPoolExecutor(4) as pool:
        forced_out = pool.submit(lambda: list(engine.submit(constrained)))
        others = list(pool.map(lambda r: solo(engine, r), free))
    assert others == alone
    final = forced_out.result()[-1]
    assert isinstance(final, Final)
    assert final.generation_tokens == 16
    assert text_of(forced_out.result()) == engine.tokenizer.decode([forced] * 16)
    # The mlx-lm protocol: the prompt first, then one more token per call.
    assert contexts[0] == prompts[0]
    assert all(b[:-1] == a for a, b in itertools.pairwise(contexts))


def test_a_failing_processor_or_timeout_fails_only_its_request(
    engine: Engine, prompts: list[list[int]]
) -> None:
    calls = 0

    def breaks_on_third_call(tokens: Any, logits: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            msg = "grammar rejected everything"
            raise RuntimeError(msg)
        return logits

    broken = Request(prompts[0], settings(0), logits_processors=[breaks_on_third_call])
    late = Request(prompts[1], settings(1, max_tokens=5000, timeout=0.05))
    fine = [Request(p, settings(i)) for i, p in enumerate(prompts[2:5], start=2)]
    alone = [solo(engine, r) for r in fine]
    with ThreadPoolExecutor(5) as pool:
        failures = [
            pool.submit(lambda r=r: list(engine.submit(r))) for r in (broken, late)
        ]
        others = list(pool.map(lambda r: solo(engine, r), fine))
    assert others == alone
    with pytest.raises(RuntimeError, match="grammar rejected everything"):
        failures[0].result()
    with pytest.raises(GenerationTimeoutError, match=r"timeout=0\.05"):
        failures[1].result()
    assert solo(engine, fine[0]) == alone[0]  # and the engine serves on


def test_beyond_the_queue_submit_raises_a_clear_error(
    make_engine: Callable[..., Engine], prompts: list[list[int]]
) -> None:
    engine = make_engine("tiny-small", max_batch_size=1, max_queue=1)
    endless = Request(prompts[0], settings(0, max_tokens=8000))
    running, waiting = engine.submit(endless), engine.submit(endless)
    with pytest.raises(EngineOverloadedError, match=r"max_queue=1 waiting"):
        engine.submit(endless)
    running.cancel()
    waiting.cancel()
    wait_for(lambda: engine.finished["cancelled"] == 2)
    assert solo(engine, Request(prompts[1], settings(1, max_tokens=2)))


def test_models_that_cannot_batch_serve_one_at_a_time(
    make_engine: Callable[..., Engine], prompts: list[list[int]]
) -> None:
    engine = make_engine("tiny-serial", batched=False)
    requests = [Request(p, settings(i)) for i, p in enumerate(prompts[:4])]
    alone = [solo(engine, r) for r in requests]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda r: solo(engine, r), requests)) == alone
    assert engine.largest_batch == 1
    turn2 = Request([*prompts[0], *prompts[1]], settings(0))
    final = list(engine.submit(turn2))[-1]
    assert isinstance(final, Final)
    assert final.cached_tokens == len(prompts[0])
    handle = iter(engine.submit(Request(prompts[5], settings(5, max_tokens=5000))))
    next(handle)
    handle.close()
    wait_for(lambda: engine.finished["cancelled"] == 1)


async def test_chat_astreams_match_solo_and_one_is_abandoned(
    tiny_model_path: str,
) -> None:
    chat = ChatMLX(model=tiny_model_path, max_tokens=12, temperature=1.0)
    questions = [f"Question {i}: what is {i} + {i}?" for i in range(8)]

    async def answer(i: int) -> str:
        chunks = [c async for c in chat.astream(questions[i], seed=i)]
        return "".join(str(c.content) for c in chunks)

    async def abandon() -> None:
        stream = chat.astream("Tell me a long story", max_tokens=5000, seed=1)
        async for i, _ in _aenumerate(stream):
            if i == 2:
                break
        await stream.aclose()

    alone = [await answer(i) for i in range(8)]
    together = await asyncio.gather(abandon(), *(answer(i) for i in range(8)))
    assert together[1:] == alone


async def _aenumerate(agen: Any) -> Any:
    i = 0
    async for item in agen:
        yield i, item
        i += 1
